//! The dashboard (`/ui`): its page and headers, and the page itself in a real browser (Debian's
//! `chromium`, headless, driven by chromedriver from `tests/python/dashboard.py`).

mod util;

use berth_testkit::registry::http_request;
use util::server::*;

/// The page loads without a key (it holds no data) under a strict Content-Security-Policy; what it
/// shows needs one.
#[test]
fn the_page_is_served_with_a_strict_policy_and_its_data_needs_a_key() {
    let server = Server::start();
    server.berth.ok(&["keys", "create", "--name", "viewer"]);
    let (status, raw) = http_request(server.port, "GET", "/ui", &[], b"").unwrap();
    let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("content-security-policy: default-src 'none'; script-src 'self'"), "{text}");
    assert!(text.contains("x-frame-options: deny") && text.contains("x-content-type-options: nosniff"), "{text}");
    for asset in ["/ui/app.js", "/ui/app.css"] {
        assert_eq!(http_request(server.port, "GET", asset, &[], b"").unwrap().0, 200, "{asset}");
    }
    let (status, raw) = http_request(server.port, "GET", "/ui/state", &[], b"").unwrap();
    assert_eq!(status, 401, "{}", String::from_utf8_lossy(&raw));
    // A page from another origin may not read it either (the API's Origin check).
    let foreign = [("Origin", "http://evil.example")];
    assert_eq!(http_request(server.port, "GET", "/ui/state", &foreign, b"").unwrap().0, 403);
    // A browser pointed at the server itself lands on the page.
    let (status, raw) = http_request(server.port, "GET", "/", &[], b"").unwrap();
    assert!(status == 200 && String::from_utf8_lossy(&raw).contains("<!doctype html>"), "{status}");
}

/// `berth serve --no-ui`: no page, no state (404), the API as before.
#[test]
fn the_dashboard_can_be_turned_off() {
    let server = Server::start_with(&["--no-ui"]);
    for path in ["/", "/ui", "/ui/app.js", "/ui/state"] {
        assert_eq!(http_request(server.port, "GET", path, &[], b"").unwrap().0, 404, "{path}");
    }
    assert_eq!(http_request(server.port, "GET", "/v1/models", &[], b"").unwrap().0, 200);
}

/// In chromium: a key is asked for and a wrong one refused; an inference key sees the models but
/// no buttons; a burst of requests moves the counters and the chart, of all models and of one; the
/// playground streams an answer with its TTFT, and one held to a JSON schema; an admin key sees
/// usage by key and by model, steps, promotes and rolls back a rollout, and loads, pins, unpins and
/// unloads models from the page; no console errors.
/// Screenshots at desktop and phone widths are kept in `BERTH_DASHBOARD_SHOTS` when it is set (to
/// refresh docs/).
#[test]
fn the_dashboard_works_in_a_real_browser_within_each_keys_scopes() {
    let server = Server::start();
    // A deployment rolling out to a second version (the same weights, packaged with another context).
    let gguf = berth_testkit::models::smollm2_gguf().display().to_string();
    server.berth.ok(&["package", "--gguf", &gguf, "smollm2:v1"]);
    server.berth.ok(&["package", "--gguf", &gguf, "--context-size", "4096", "smollm2:v2"]);
    // Packaged apart from v1 by its context (the same file and options give the same manifest).
    server.berth.ok(&["package", "--gguf", &gguf, "--context-size", "2048", "smollm2:spare"]);
    let url = format!("http://127.0.0.1:{}", server.port);
    server.berth.ok(&["deploy", "chat", "--model", "smollm2:v1", "--url", &url]);
    server.berth.ok(&["rollout", "chat", "--to", "smollm2:v2", "--max-error-rate", "0.5", "--url", &url]);
    let admin = server.berth.ok(&["keys", "create", "--name", "ops", "--scope", "admin"]).trim().to_string();
    let viewer = server.berth.ok(&["keys", "create", "--name", "viewer"]).trim().to_string();
    let shots = tempfile::tempdir().unwrap();
    let dir = shots.path().display().to_string();
    run_python("dashboard.py", &[&server.port.to_string(), &admin, &viewer, &dir], &server);
    for name in ["dashboard-desktop.png", "dashboard-phone.png"] {
        let png = std::fs::read(shots.path().join(name)).expect("the screenshot");
        assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{name}: {} bytes", png.len());
        if let Some(keep) = std::env::var_os("BERTH_DASHBOARD_SHOTS") {
            std::fs::write(std::path::Path::new(&keep).join(name), &png).unwrap();
        }
    }
}

/// `/api/pin` (admin keys only) loads a model and keeps it, and `/ui/state` shows the store's
/// models beside those in memory, each key's view within its scopes, and one model's history when
/// asked.
#[test]
fn pins_need_an_admin_key_and_the_state_shows_the_store_and_memory() {
    let server = Server::start();
    let admin = server.berth.ok(&["keys", "create", "--name", "ops", "--scope", "admin"]).trim().to_string();
    let viewer = server.berth.ok(&["keys", "create", "--name", "viewer"]).trim().to_string();
    let call = |key: &str, method: &str, path: &str, body: &str| -> (u16, serde_json::Value) {
        let bearer = format!("Bearer {key}");
        let headers = [("Authorization", bearer.as_str()), ("Content-Type", "application/json")];
        let (status, raw) = http_request(server.port, method, path, &headers, body.as_bytes()).unwrap();
        (status, serde_json::from_str(&body_of(&raw)).unwrap_or_default())
    };
    let row = |state: &serde_json::Value, name: &str| -> serde_json::Value {
        state["models"].as_array().unwrap().iter().find(|m| m["name"] == name).cloned().unwrap_or_default()
    };

    let (status, body) = call(&viewer, "POST", "/api/pin", r#"{"model":"minilm"}"#);
    assert_eq!(status, 403, "an inference key may not pin: {body}");
    let (_, state) = call(&viewer, "GET", "/ui/state", "");
    assert_eq!(state["admin"], false);
    assert!(state["usage"].is_null(), "{state}");
    assert_eq!(row(&state, "ai/minilm:latest")["state"], "on disk", "{state}");
    assert_eq!(row(&state, "ai/smollm2:latest")["state"], "ready", "{state}");

    let (status, body) = call(&admin, "POST", "/api/pin", r#"{"model":"minilm"}"#);
    assert_eq!((status, &body["pinned"]), (200, &serde_json::json!(true)), "{body}");
    let (_, state) = call(&admin, "GET", "/ui/state", "");
    let minilm = row(&state, "ai/minilm:latest");
    assert_eq!(
        (&minilm["loaded"], &minilm["pinned"], &minilm["kind"]),
        (&true.into(), &true.into(), &"embedding".into())
    );
    assert!(minilm["unloads_in_seconds"].is_null(), "a pinned model never unloads: {minilm}");
    assert!(state["usage"]["model"]["week"].is_array(), "admins see usage by model: {state}");

    let (status, body) = call(&admin, "POST", "/api/pin", r#"{"model":"minilm","pin":false}"#);
    assert_eq!(status, 200, "{body}");
    let (_, state) = call(&admin, "GET", "/ui/state", "");
    let minilm = row(&state, "ai/minilm:latest");
    assert_eq!((&minilm["loaded"], &minilm["pinned"]), (&true.into(), &false.into()), "unpinned, still loaded");

    let (status, body) = call(&admin, "POST", "/api/pin", r#"{"model":"nothing-here"}"#);
    assert_eq!(status, 404, "{body}");
    let (status, body) = call(&admin, "POST", "/api/pin", r#"{"model":"minilm","forever":true}"#);
    assert_eq!(status, 400, "unknown fields are refused: {body}");

    let (_, state) = call(&viewer, "GET", "/ui/state?of=ai%2Fsmollm2%3Alatest", "");
    assert_eq!(state["history"]["of"], "ai/smollm2:latest", "{state}");
}
