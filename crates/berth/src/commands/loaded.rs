//! `berth ps` and `berth unload`: what a running `berth serve` holds in memory, and letting go of a
//! model. They speak to the server's Ollama-compatible API (`/api/ps`, and `/api/generate` with
//! `keep_alive: 0`, which is how Ollama unloads), so they work against Ollama too.

use anyhow::{Context as _, bail};
use serde_json::Value;

#[derive(clap::Args)]
pub struct PsArgs {
    /// The server's base URL.
    #[arg(long, env = "BERTH_URL", default_value = "http://127.0.0.1:12480")]
    url: String,
    /// Print the server's JSON.
    #[arg(long)]
    json: bool,
    /// An API key, for a server that has keys (`berth keys create`).
    #[arg(long, env = "BERTH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

#[derive(clap::Args)]
pub struct UnloadArgs {
    /// The model to unload, e.g. ai/smollm2.
    model: String,
    /// The server's base URL.
    #[arg(long, env = "BERTH_URL", default_value = "http://127.0.0.1:12480")]
    url: String,
    /// An admin API key, for a server that has keys (`berth keys create --scope admin`).
    #[arg(long, env = "BERTH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

fn call(method: reqwest::Method, url: &str, key: Option<&str>, body: Option<Value>) -> anyhow::Result<Value> {
    call_within(method, url, key, body, std::time::Duration::from_secs(30))
}

/// Call the server's API and return its JSON, or fail with the server's own message.
pub(crate) fn call_within(
    method: reqwest::Method,
    url: &str,
    key: Option<&str>,
    body: Option<Value>,
    timeout: std::time::Duration,
) -> anyhow::Result<Value> {
    berth_store::registry::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let client = reqwest::Client::builder().timeout(timeout).build()?;
        let mut request = client.request(method, url);
        if let Some(k) = key {
            request = request.bearer_auth(k);
        }
        if let Some(b) = body {
            request = request.json(&b);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach {url}; is `berth serve` running there? (--url or BERTH_URL)"))?;
        let status = response.status();
        let text = response.text().await.context("the server's answer broke off")?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if !status.is_success() {
            let message = value["error"]["message"].as_str().or(value["error"].as_str()).map(str::to_string);
            bail!("the server answered {status}: {}", message.unwrap_or_else(|| value.to_string()));
        }
        Ok(value)
    })
}

fn mib(bytes: f64) -> String {
    format!("{:.0} MiB", bytes / (1u64 << 20) as f64)
}

pub fn ps(args: PsArgs) -> anyhow::Result<()> {
    let url = format!("{}/api/ps", args.url.trim_end_matches('/'));
    let v = call(reqwest::Method::GET, &url, args.api_key.as_deref(), None)?;
    if args.json {
        println!("{v}");
        return Ok(());
    }
    let models = v["models"].as_array().cloned().unwrap_or_default();
    println!(
        "{:<32} {:<12} {:<9} {:>10} {:>8} {:>8} {:>8} {:>8} {:>10} {:>12}",
        "NAME", "VERSION", "STATE", "MEMORY", "RUNNING", "WAITING", "CONTEXT", "THREADS", "IDLE", "KEEP ALIVE"
    );
    for m in &models {
        let b = &m["berth"];
        let idle = b["idle_seconds"].as_f64().map(|s| format!("{s:.0} s")).unwrap_or_else(|| "-".into());
        let keep = match b["keep_alive_seconds"].as_f64() {
            _ if b["pinned"].as_bool() == Some(true) => "pinned".to_string(),
            Some(s) if s < 0.0 => "forever".to_string(),
            Some(s) => format!("{s:.0} s"),
            None => "-".to_string(),
        };
        let limits = &b["limits"];
        // Running out of the model's maximum; its own threads are marked, shared ones are not.
        let running = match limits["max_running"].as_u64() {
            Some(max) => format!("{}/{max}", b["running"].as_u64().unwrap_or(0)),
            None => "-".to_string(),
        };
        let threads = match (limits["threads"].as_u64(), limits["own_threads"].as_bool()) {
            (Some(n), Some(true)) => format!("{n} own"),
            (Some(n), _) => n.to_string(),
            (None, _) => "-".to_string(),
        };
        println!(
            "{:<32} {:<12} {:<9} {:>10} {:>8} {:>8} {:>8} {:>8} {:>10} {:>12}",
            m["name"].as_str().unwrap_or("?"),
            b["version"].as_str().unwrap_or("-"),
            b["state"].as_str().unwrap_or("?"),
            mib(b["memory_bytes"].as_f64().or(m["size"].as_f64()).unwrap_or(0.0)),
            running,
            b["waiting"].as_u64().unwrap_or(0),
            limits["context"].as_u64().map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
            threads,
            idle,
            keep
        );
    }
    for d in v["deployments"].as_array().into_iter().flatten() {
        println!("deployment {}: {}", d["name"].as_str().unwrap_or("?"), super::deploy::traffic(d));
    }
    if let Some(budget) = v["memory_budget_bytes"].as_f64() {
        let used: f64 = models.iter().filter_map(|m| m["berth"]["memory_bytes"].as_f64()).sum();
        println!("memory: {} of the {} budget", mib(used), mib(budget));
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct HealthArgs {
    /// The server's base URL.
    #[arg(long, env = "BERTH_URL", default_value = "http://127.0.0.1:12480")]
    url: String,
}

/// Whether a server answers its `/health` probe (open to all, so no key): a container's health
/// check, where the image has no shell or curl.
pub fn health(args: HealthArgs) -> anyhow::Result<()> {
    let url = format!("{}/health", args.url.trim_end_matches('/'));
    call_within(reqwest::Method::GET, &url, None, None, std::time::Duration::from_secs(3))?;
    println!("ok");
    Ok(())
}

pub fn unload(args: UnloadArgs) -> anyhow::Result<()> {
    let url = format!("{}/api/generate", args.url.trim_end_matches('/'));
    let body = serde_json::json!({"model": args.model, "keep_alive": 0});
    let v = call(reqwest::Method::POST, &url, args.api_key.as_deref(), Some(body))?;
    println!("Unloaded {}", v["model"].as_str().unwrap_or(&args.model));
    Ok(())
}
