//! Deployments through the real binary: a rollout and a rollback under streaming load, health
//! gates and guards that keep the stable version serving, a restart mid-rollout, sticky
//! assignment, and a registry tag followed in a real `docker-registry`.

mod util;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use berth_testkit::models;
use berth_testkit::registry::{Registry, http_request};
use serde_json::Value;
use util::Berth;
use util::server::{Server, body_of};

/// No phase: requests sent while an operation runs are not counted in a phase's split.
const BETWEEN: usize = usize::MAX;

fn smollm2() -> String {
    models::smollm2_gguf().display().to_string()
}

/// A home with three versions of SmolLM2: the same weights under different packages (the
/// context each declares differs, so each is its own manifest), `short` a bad release whose
/// 64-token context fails most real prompts.
fn home_with_versions(home: &std::path::Path) -> Berth {
    let berth = Berth::new().env("BERTH_HOME", &home.display().to_string());
    berth.ok(&["package", "--gguf", &smollm2(), "smollm2:v1"]);
    berth.ok(&["package", "--gguf", &smollm2(), "--context-size", "4096", "smollm2:v2"]);
    berth.ok(&["package", "--gguf", &smollm2(), "--context-size", "64", "smollm2:short"]);
    berth
}

fn cli(server: &Server, args: &[&str]) -> String {
    let url = format!("http://127.0.0.1:{}", server.port);
    server.berth.ok(&[args, &["--url", &url]].concat())
}

fn cli_fails(server: &Server, args: &[&str]) -> String {
    let url = format!("http://127.0.0.1:{}", server.port);
    server.berth.fails(&[args, &["--url", &url]].concat())
}

fn status(server: &Server, name: &str) -> Value {
    serde_json::from_str(&cli(server, &["rollout", "status", name, "--json"])).expect("status JSON")
}

/// The version label (12 hex digits) of a model in the server's store.
fn label(server: &Server, model: &str) -> String {
    let v = server.berth.json(&["inspect", model, "--json"]);
    let digest = v["digest"].as_str().unwrap_or_else(|| panic!("no digest in {v}"));
    digest.trim_start_matches("sha256:")[..12].to_string()
}

fn header(raw: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(raw);
    let head = text.split("\r\n\r\n").next()?.to_string();
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

/// A chat request to `model`; returns the status, the version that answered and the body.
fn chat(
    server: &Server,
    model: &str,
    prompt: &str,
    stream: bool,
    session: Option<&str>,
) -> (u16, Option<String>, String) {
    let body = serde_json::json!({
        "model": model, "stream": stream, "max_tokens": 4,
        "messages": [{"role": "user", "content": prompt}],
    })
    .to_string();
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(s) = session {
        headers.push(("x-berth-session", s));
    }
    let (status, raw) =
        http_request(server.port, "POST", "/v1/chat/completions", &headers, body.as_bytes()).expect("request");
    (status, header(&raw, "x-berth-model-version"), body_of(&raw))
}

/// What the load generator saw of one request.
struct Answer {
    phase: usize,
    ok: bool,
    version: Option<String>,
    detail: String,
}

#[test]
fn a_full_rollout_and_a_rollback_under_streaming_load_drop_nothing_and_split_by_weight() {
    let home = tempfile::tempdir().unwrap();
    let server = Server::serve(home_with_versions(home.path()), &[]);
    let (v1, v2) = (label(&server, "smollm2:v1"), label(&server, "smollm2:v2"));
    cli(&server, &["deploy", "chat", "--model", "smollm2:v1"]);

    let phase = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(std::sync::Mutex::new(Vec::<Answer>::new()));
    let clients: Vec<_> = (0..16)
        .map(|i| {
            let (phase, stop, answers) = (phase.clone(), stop.clone(), answers.clone());
            let port = server.port;
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let started_in = phase.load(Ordering::SeqCst);
                    let body = serde_json::json!({
                        "model": "chat", "stream": true, "max_tokens": 4,
                        "messages": [{"role": "user", "content": format!("Say hello to client {i}.")}],
                    })
                    .to_string();
                    let headers = [("Content-Type", "application/json")];
                    let answer = match http_request(port, "POST", "/v1/chat/completions", &headers, body.as_bytes()) {
                        Ok((status, raw)) => {
                            let text = body_of(&raw);
                            let ok = status == 200 && text.contains("data: [DONE]") && !text.contains("\"error\"");
                            Answer {
                                phase: started_in,
                                ok,
                                version: header(&raw, "x-berth-model-version"),
                                detail: format!("{status} {text}"),
                            }
                        }
                        Err(e) => Answer { phase: started_in, ok: false, version: None, detail: e.to_string() },
                    };
                    let ended_in = phase.load(Ordering::SeqCst);
                    let answer = Answer { phase: if ended_in == started_in { started_in } else { BETWEEN }, ..answer };
                    answers.lock().unwrap().push(answer);
                }
            })
        })
        .collect();
    let in_phase = |p: usize| answers.lock().unwrap().iter().filter(|a| a.phase == p).count();
    let wait_for = |p: usize, n: usize| {
        let deadline = Instant::now() + Duration::from_secs(300);
        while in_phase(p) < n {
            assert!(Instant::now() < deadline, "phase {p}: only {} requests in 300 s", in_phase(p));
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // Each operation runs between phases: requests sent meanwhile count for nothing but success.
    let operate = |next: usize, args: &[&str]| {
        phase.store(BETWEEN, Ordering::SeqCst);
        let out = cli(&server, args);
        phase.store(next, Ordering::SeqCst);
        out
    };
    wait_for(0, 50);
    operate(1, &["rollout", "chat", "--to", "smollm2:v2", "--canary", "10"]);
    wait_for(1, 200);
    operate(2, &["rollout", "step", "chat", "--weight", "50"]);
    wait_for(2, 200);
    operate(3, &["rollout", "promote", "chat"]);
    wait_for(3, 200);
    operate(4, &["rollback", "chat"]);
    wait_for(4, 200);
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }

    let answers = answers.lock().unwrap();
    let failed: Vec<&str> = answers.iter().filter(|a| !a.ok).map(|a| a.detail.as_str()).collect();
    assert!(failed.is_empty(), "{} of {} requests failed; first: {:?}", failed.len(), answers.len(), failed.first());
    for a in answers.iter() {
        let v = a.version.as_deref().unwrap_or("none");
        assert!(v == v1 || v == v2, "a response names version {v}, neither {v1} nor {v2}");
    }
    let mut report = Vec::new();
    for (p, canary_weight) in [(0usize, 0.0), (1, 10.0), (2, 50.0), (3, 100.0), (4, 0.0)] {
        let of_phase: Vec<&Answer> = answers.iter().filter(|a| a.phase == p).collect();
        let on_v2 = of_phase.iter().filter(|a| a.version.as_deref() == Some(v2.as_str())).count();
        let share = 100.0 * on_v2 as f64 / of_phase.len() as f64;
        report.push(format!(
            "phase {p}: {on_v2}/{} on the new version ({share:.1}%, weight {canary_weight})",
            of_phase.len()
        ));
        assert!((share - canary_weight).abs() <= 5.0, "{}", report.join("; "));
    }
    println!("{} requests, 0 failed; {}", answers.len(), report.join("; "));
    let s = status(&server, "chat");
    assert_eq!(s["stable"]["version"], v1.as_str(), "{s}");
    assert_eq!(s["previous"]["version"], v2.as_str(), "{s}");
    // The store kept each version pinned (`repository@digest`) while the deployment might serve it;
    // removing the deployment removes those pins, and the tags stay.
    assert!(server.berth.ok(&["ls"]).contains("@sha256:"));
    cli(&server, &["undeploy", "chat"]);
    let listed = server.berth.ok(&["ls"]);
    assert!(!listed.contains("@sha256:") && listed.contains("smollm2:v1") && listed.contains("smollm2:v2"), "{listed}");
    let (code, _, body) = chat(&server, "chat", "Hi", false, None);
    assert_eq!(code, 404, "{body}");
}

#[test]
fn a_canary_that_cannot_load_or_answer_well_leaves_the_stable_version_serving() {
    let home = tempfile::tempdir().unwrap();
    let berth = home_with_versions(home.path());
    berth.ok(&["package", "--safetensors-dir", &models::minilm_dir().display().to_string(), "minilm"]);
    // A release whose weights are damaged in the store: its own blob (the file with a byte
    // more), one byte flipped after packaging.
    let copy = home.path().join("copy.gguf");
    let mut bytes = std::fs::read(smollm2()).unwrap();
    bytes.push(0);
    std::fs::write(&copy, &bytes).unwrap();
    berth.ok(&["package", "--gguf", &copy.display().to_string(), "smollm2:damaged"]);
    let inspect = berth.json(&["inspect", "smollm2:damaged", "--json"]);
    let layer = inspect["manifest"]["layers"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["mediaType"].as_str().is_some_and(|m| m.contains("gguf"))))
        .and_then(|l| l["digest"].as_str())
        .unwrap_or_else(|| panic!("no GGUF layer in {inspect}"))
        .trim_start_matches("sha256:")
        .to_string();
    let blob = home.path().join("models/blobs/sha256").join(&layer);
    let mut damaged = std::fs::read(&blob).unwrap();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0xff;
    std::fs::write(&blob, damaged).unwrap();

    let server = Server::serve(berth, &[]);
    let v1 = label(&server, "smollm2:v1");
    cli(&server, &["deploy", "chat", "--model", "smollm2:v1"]);

    for (bad, why) in [("smollm2:damaged", "damaged"), ("minilm", "embedding model")] {
        let err = cli_fails(&server, &["rollout", "chat", "--to", bad]);
        assert!(err.contains("did not start") && err.contains(why), "{bad}: {err}");
        let s = status(&server, "chat");
        assert!(s["rollout"].is_null(), "{s}");
        assert_eq!(s["last_rollout"]["outcome"], "failed", "{s}");
        assert!(s["last_rollout"]["reason"].as_str().unwrap().contains(why), "{s}");
        let (code, version, body) = chat(&server, "chat", "Hi", false, None);
        assert_eq!((code, version.as_deref()), (200, Some(v1.as_str())), "{body}");
    }
    let shown = cli(&server, &["rollout", "status", "chat"]);
    assert!(shown.contains("last rollout: failed") && shown.contains("embedding model"), "{shown}");

    // A canary that loads and answers the smoke request, but fails real requests (its package
    // declares a 64-token context): the error-rate guard aborts it by itself.
    cli(
        &server,
        &[
            "rollout",
            "chat",
            "--to",
            "smollm2:short",
            "--canary",
            "50",
            "--max-error-rate",
            "0.2",
            "--min-requests",
            "10",
        ],
    );
    let long = "Please summarise the following notes. ".repeat(12);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = status(&server, "chat");
        if s["rollout"].is_null() {
            assert_eq!(s["last_rollout"]["outcome"], "aborted", "{s}");
            assert!(s["last_rollout"]["reason"].as_str().unwrap().contains("error-rate guard"), "{s}");
            break;
        }
        assert!(Instant::now() < deadline, "the guard did not abort the canary: {s}");
        for _ in 0..10 {
            chat(&server, "chat", &long, false, None);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for _ in 0..10 {
        let (code, version, body) = chat(&server, "chat", &long, false, None);
        assert_eq!((code, version.as_deref()), (200, Some(v1.as_str())), "{body}");
    }
    assert!(server.log().contains("aborting the rollout: error-rate guard"), "{}", server.log());
}

#[test]
fn a_restart_in_the_middle_of_a_rollout_resumes_it_and_sessions_stay_on_their_version() {
    let home = tempfile::tempdir().unwrap();
    let serve = || Server::serve(Berth::new().env("BERTH_HOME", &home.path().display().to_string()), &[]);
    home_with_versions(home.path());
    let (v1, v2);
    {
        let server = serve();
        (v1, v2) = (label(&server, "smollm2:v1"), label(&server, "smollm2:v2"));
        cli(&server, &["deploy", "chat", "--model", "smollm2:v1"]);
        cli(&server, &["rollout", "chat", "--to", "smollm2:v2", "--canary", "30"]);
    }
    let server = serve();
    let s = status(&server, "chat");
    assert_eq!((s["rollout"]["state"].as_str(), s["rollout"]["weight"].as_u64()), (Some("canary"), Some(30)), "{s}");
    assert_eq!(s["rollout"]["to"]["version"], v2.as_str(), "{s}");
    let on_v2 = (0..100).filter(|_| chat(&server, "chat", "Hi", false, None).1.as_deref() == Some(v2.as_str())).count();
    assert!((25..=35).contains(&on_v2), "{on_v2} of 100 on the canary at 30%");

    // Sticky: a session always gets the same version, and sessions spread over both.
    cli(&server, &["rollout", "step", "chat", "--weight", "50"]);
    let mut seen = std::collections::HashSet::new();
    for session in 0..20 {
        let id = format!("conversation-{session}");
        let versions: std::collections::HashSet<String> =
            (0..4).map(|_| chat(&server, "chat", "Hi", false, Some(&id)).1.expect("a version header")).collect();
        assert_eq!(versions.len(), 1, "session {id} saw {versions:?}");
        seen.extend(versions);
    }
    assert_eq!(seen, [v1.clone(), v2.clone()].into_iter().collect(), "sessions at 50% use both versions");
}

#[test]
fn a_tag_moved_in_a_registry_is_followed_and_rolled_out() {
    let registry = Registry::start();
    let tag = format!("{}/team/chat:prod", registry.host());
    let publisher = Berth::new();
    publisher.ok(&["package", "--gguf", &smollm2(), &tag]);
    publisher.ok(&["push", &tag]);

    let server = Server::serve(Berth::new(), &[]);
    cli(
        &server,
        &[
            "deploy",
            "chat",
            "--model",
            &tag,
            "--follow",
            "--follow-interval",
            "1s",
            "--step",
            "100",
            "--interval",
            "1s",
        ],
    );
    let first = status(&server, "chat")["stable"]["version"].as_str().unwrap().to_string();
    let (code, version, _) = chat(&server, "chat", "Hi", false, None);
    assert_eq!((code, version), (200, Some(first.clone())));

    // A new release under the same tag: another package of the same weights.
    publisher.ok(&["package", "--gguf", &smollm2(), "--context-size", "4096", &tag]);
    publisher.ok(&["push", &tag]);
    let pushed = publisher.json(&["inspect", &tag, "--json"])["digest"].as_str().unwrap().trim_start_matches("sha256:")
        [..12]
        .to_string();
    assert_ne!(pushed, first);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = status(&server, "chat");
        if s["stable"]["version"] == pushed.as_str() {
            assert_eq!(s["last_rollout"]["outcome"], "promoted", "{s}");
            break;
        }
        assert!(Instant::now() < deadline, "the new digest was not rolled out: {s}");
        std::thread::sleep(Duration::from_millis(250));
    }
    let (code, version, _) = chat(&server, "chat", "Hi", false, None);
    assert_eq!((code, version), (200, Some(pushed)));
}

#[test]
fn a_rollout_that_cannot_fit_beside_the_stable_version_is_refused_up_front() {
    let home = tempfile::tempdir().unwrap();
    // Room for one version (weights, a 64 MiB KV cache, working memory), not for two.
    let server = Server::serve(home_with_versions(home.path()), &["--kv-cache", "64MiB", "--memory-budget", "350MiB"]);
    let v1 = label(&server, "smollm2:v1");
    cli(&server, &["deploy", "chat", "--model", "smollm2:v1"]);
    let err = cli_fails(&server, &["rollout", "chat", "--to", "smollm2:v2"]);
    assert!(
        err.contains("503") && err.contains("stable version keeps serving") && err.contains("--memory-budget"),
        "{err}"
    );
    let s = status(&server, "chat");
    assert!(s["rollout"].is_null() && s["last_rollout"].is_null(), "nothing started: {s}");
    let (code, version, body) = chat(&server, "chat", "Hi", false, None);
    assert_eq!((code, version.as_deref()), (200, Some(v1.as_str())), "{body}");
    // Nor does another model evict it: a version serving a deployment is not idle memory.
    let (code, _, body) = chat(&server, "smollm2:v2", "Hi", false, None);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("serving a deployment"), "{body}");
}

/// Two servers on one shared PostgreSQL (`BERTH_DATABASE_URL`): a deployment made at one is
/// served by the other, which pulls the version from its registry by digest; a rollout started at
/// the second is seen at the first and promoted there; the canary's version reaches the first server's
/// store by itself; an undeploy at one holds at both.
#[test]
fn servers_on_a_shared_database_share_their_deployments() {
    let postgres = berth_testkit::postgres::Postgres::start();
    let registry = Registry::start();
    let (v1, v2) = (format!("{}/team/chat:v1", registry.host()), format!("{}/team/chat:v2", registry.host()));
    let publisher = Berth::new();
    publisher.ok(&["package", "--gguf", &smollm2(), &v1]);
    publisher.ok(&["package", "--gguf", &smollm2(), "--context-size", "4096", &v2]);
    publisher.ok(&["push", &v1]);
    publisher.ok(&["push", &v2]);
    let label_of = |tag: &str| {
        publisher.json(&["inspect", tag, "--json"])["digest"].as_str().unwrap().trim_start_matches("sha256:")[..12]
            .to_string()
    };
    let (first, second) = (label_of(&v1), label_of(&v2));
    let shared = || Berth::new().env("BERTH_DATABASE_URL", &postgres.url());
    let (a, b) = (Server::serve(shared(), &[]), Server::serve(shared(), &[]));
    let serves = |server: &Server, version: &str, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (code, answered, body) = chat(server, "chat", "Hi", false, None);
            if code == 200 && answered.as_deref() == Some(version) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {code} {answered:?} {body}\nlog:\n{}", server.log());
            std::thread::sleep(Duration::from_millis(250));
        }
    };

    // Deployed at A (which has v1 in its store); B has nothing, pulls it and serves it.
    a.berth.ok(&["pull", &v1]);
    cli(&a, &["deploy", "chat", "--model", &v1]);
    serves(&b, &first, "B serves the deployment made at A");
    assert!(status(&b, "chat")["stable"]["version"] == first.as_str());

    // A rollout started at B (v2 pulled there); A sees it, gets v2 by itself, and promotes it.
    b.berth.ok(&["pull", &v2]);
    cli(&b, &["rollout", "chat", "--to", &v2]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(&a, "chat")["rollout"]["state"] != "canary" {
        assert!(Instant::now() < deadline, "A did not see the rollout: {}", status(&a, "chat"));
        std::thread::sleep(Duration::from_millis(200));
    }
    cli(&a, &["rollout", "promote", "chat"]);
    serves(&b, &second, "B serves the version promoted at A");
    serves(&a, &second, "A serves the version it pulled by itself");

    // Removed at B: gone at A too.
    cli(&b, &["undeploy", "chat"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, _, body) = chat(&a, "chat", "Hi", false, None);
        if code == 404 {
            break;
        }
        assert!(Instant::now() < deadline, "A still serves the undeployed chat: {code} {body}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!a.log().contains(postgres.password()) && !b.log().contains(postgres.password()));
}
