//! `berth deploy`, `berth rollout`, `berth rollback`, `berth deployments`, `berth undeploy`: a
//! running server's deployments, through its admin API (`/api/deployments`). The server does the
//! work (health gates, guards, draining); these commands ask and show the answer.

use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::{Map, Value, json};

use super::loaded::call_within;

/// A health gate loads a model: allow for a large one.
const GATE_TIMEOUT: Duration = Duration::from_secs(900);

#[derive(clap::Args)]
pub struct ServerFlags {
    /// The server's base URL.
    #[arg(long, env = "BERTH_URL", default_value = "http://127.0.0.1:12480")]
    url: String,
    /// An admin API key, for a server that has keys (`berth keys create --scope admin`).
    #[arg(long, env = "BERTH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Print the server's JSON.
    #[arg(long)]
    json: bool,
}

/// A version's own settings.
#[derive(clap::Args)]
pub struct SettingsFlags {
    /// Tokens of context a request may use (less than the model's own).
    #[arg(long, value_name = "TOKENS")]
    context: Option<usize>,
    /// How long the version stays loaded when idle ("5m", "1h", -1 for ever).
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true)]
    keep_alive: Option<String>,
    /// Never evict the version to make room for other models.
    #[arg(long)]
    pin: bool,
}

/// How rollouts proceed and when they stop by themselves.
#[derive(clap::Args)]
pub struct PolicyFlags {
    /// Percent of requests a new version gets first.
    #[arg(long, value_name = "PERCENT")]
    canary: Option<u8>,
    /// Percent added at each step (`berth rollout step`, or each --interval).
    #[arg(long, value_name = "PERCENT")]
    step: Option<u8>,
    /// Step automatically this often while the guards hold ("30s", "10m").
    #[arg(long, value_name = "DURATION")]
    interval: Option<String>,
    /// Abort when more than this share of the canary's requests fail (0.05 is 5%).
    #[arg(long, value_name = "SHARE")]
    max_error_rate: Option<f64>,
    /// Abort when the canary's TTFT p95 exceeds the stable version's by this factor.
    #[arg(long, value_name = "FACTOR")]
    max_ttft_ratio: Option<f64>,
    /// The span of requests the guards look at ("60s").
    #[arg(long, value_name = "DURATION")]
    guard_window: Option<String>,
    /// Requests the canary must have answered in the window before a guard judges it.
    #[arg(long, value_name = "N")]
    min_requests: Option<u64>,
}

#[derive(clap::Args)]
pub struct DeployArgs {
    /// The name clients will call, e.g. chat.
    name: String,
    /// The model to serve: a reference in the store (pinned to the manifest it names now), or a
    /// registry tag with --follow.
    #[arg(long)]
    model: String,
    /// Follow --model's registry tag: a new digest there is pulled and rolled out.
    #[arg(long)]
    follow: bool,
    /// How often to check the followed tag.
    #[arg(long, value_name = "DURATION", default_value = "5m", requires = "follow")]
    follow_interval: String,
    #[command(flatten)]
    settings: SettingsFlags,
    #[command(flatten)]
    policy: PolicyFlags,
    #[command(flatten)]
    server: ServerFlags,
}

#[derive(clap::Args)]
pub struct RolloutArgs {
    /// The deployment to roll out (with --to), or one of `status`, `step`, `promote`, `abort`,
    /// `refresh` followed by the deployment.
    first: String,
    /// The deployment, after an action.
    name: Option<String>,
    /// The new version: a model in the store.
    #[arg(long)]
    to: Option<String>,
    /// With `step`: the canary's new weight (percent; 100 promotes it).
    #[arg(long, value_name = "PERCENT")]
    weight: Option<u8>,
    #[command(flatten)]
    settings: SettingsFlags,
    #[command(flatten)]
    policy: PolicyFlags,
    #[command(flatten)]
    server: ServerFlags,
}

#[derive(clap::Args)]
pub struct NameArgs {
    /// The deployment.
    name: String,
    #[command(flatten)]
    server: ServerFlags,
}

#[derive(clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    server: ServerFlags,
}

fn seconds(flag: &str, text: &str) -> anyhow::Result<i64> {
    match berth_server::KeepAlive::parse_str(text) {
        Some(berth_server::KeepAlive::Forever) => Ok(-1),
        Some(berth_server::KeepAlive::For(d)) => Ok(d.as_secs() as i64),
        None => bail!("{flag} takes a duration like 30s, 5m or 1h, got {text:?}"),
    }
}

fn positive_seconds(flag: &str, text: &str) -> anyhow::Result<u64> {
    let s = seconds(flag, text)?;
    if s < 1 {
        bail!("{flag} must be at least one second, got {text:?}");
    }
    Ok(s as u64)
}

impl SettingsFlags {
    fn into_body(self, body: &mut Map<String, Value>) -> anyhow::Result<()> {
        if let Some(c) = self.context {
            body.insert("context".into(), json!(c));
        }
        if let Some(k) = &self.keep_alive {
            body.insert("keep_alive_seconds".into(), json!(seconds("--keep-alive", k)?));
        }
        if self.pin {
            body.insert("pin".into(), json!(true));
        }
        Ok(())
    }
}

impl PolicyFlags {
    /// The policy as the API takes it (a field left out, `null`, keeps the deployment's own).
    fn body(&self) -> anyhow::Result<Value> {
        let interval = self.interval.as_deref().map(|v| positive_seconds("--interval", v)).transpose()?;
        let window = self.guard_window.as_deref().map(|v| positive_seconds("--guard-window", v)).transpose()?;
        Ok(json!({
            "canary": self.canary,
            "step": self.step,
            "interval_seconds": interval,
            "max_error_rate": self.max_error_rate,
            "max_ttft_ratio": self.max_ttft_ratio,
            "window_seconds": window,
            "min_requests": self.min_requests,
        }))
    }
}

impl ServerFlags {
    fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let url = format!("{}/api/deployments{path}", self.url.trim_end_matches('/'));
        call_within(method, &url, self.api_key.as_deref(), body, GATE_TIMEOUT)
    }

    fn show(&self, v: &Value) {
        if self.json {
            println!("{v}");
        } else {
            print_deployment(v);
        }
    }
}

pub fn deploy(args: DeployArgs) -> anyhow::Result<()> {
    let mut body = Map::new();
    body.insert("model".into(), json!(args.model));
    args.settings.into_body(&mut body)?;
    body.insert("policy".into(), args.policy.body()?);
    if args.follow {
        body.insert("follow_seconds".into(), json!(positive_seconds("--follow-interval", &args.follow_interval)?));
    }
    let path = format!("/{}", args.name);
    let v = args.server.call(reqwest::Method::PUT, &path, Some(Value::Object(body)))?;
    args.server.show(&v);
    Ok(())
}

pub fn rollout(args: RolloutArgs) -> anyhow::Result<()> {
    let action = ["status", "step", "promote", "abort", "refresh"].contains(&args.first.as_str());
    let (action, name) = match (action, &args.name) {
        (true, Some(name)) => (args.first.as_str(), name.clone()),
        (true, None) => bail!("`berth rollout {}` needs the deployment: berth rollout {} NAME", args.first, args.first),
        (false, Some(extra)) => bail!(
            "unexpected {extra:?}: `berth rollout NAME --to MODEL` starts a rollout; `berth rollout status|step|promote|abort|refresh NAME` acts on one"
        ),
        (false, None) => ("start", args.first.clone()),
    };
    let path = |op: &str| format!("/{name}/{op}");
    let server = &args.server;
    let v = match action {
        "status" => server.call(reqwest::Method::GET, &format!("/{name}"), None)?,
        "step" => server.call(reqwest::Method::POST, &path("step"), Some(json!({"weight": args.weight})))?,
        "promote" | "abort" | "refresh" => server.call(reqwest::Method::POST, &path(action), None)?,
        _ => {
            let to = args.to.as_deref().context("a rollout needs the new version: berth rollout NAME --to MODEL")?;
            let mut body = Map::new();
            body.insert("to".into(), json!(to));
            args.settings.into_body(&mut body)?;
            body.insert("policy".into(), args.policy.body()?);
            server.call(reqwest::Method::POST, &path("rollout"), Some(Value::Object(body)))?
        }
    };
    server.show(&v);
    // A rollout that failed its health gate is an error for scripts.
    if action == "start" && v["rollout"].is_null() {
        let reason = v["last_rollout"]["reason"].as_str().unwrap_or("see `berth rollout status`");
        bail!("the rollout did not start: {reason}");
    }
    Ok(())
}

pub fn rollback(args: NameArgs) -> anyhow::Result<()> {
    let v = args.server.call(reqwest::Method::POST, &format!("/{}/rollback", args.name), None)?;
    args.server.show(&v);
    Ok(())
}

pub fn undeploy(args: NameArgs) -> anyhow::Result<()> {
    args.server.call(reqwest::Method::DELETE, &format!("/{}", args.name), None)?;
    if !args.server.json {
        println!("Removed deployment {}", args.name);
    }
    Ok(())
}

pub fn list(args: ListArgs) -> anyhow::Result<()> {
    let v = args.server.call(reqwest::Method::GET, "", None)?;
    if args.server.json {
        println!("{v}");
        return Ok(());
    }
    println!("{:<20} {:<40} {:<10} {:<30}", "NAME", "TRAFFIC", "ROLLOUT", "SOURCE");
    for d in v["deployments"].as_array().into_iter().flatten() {
        println!(
            "{:<20} {:<40} {:<10} {:<30}",
            d["name"].as_str().unwrap_or("?"),
            traffic(d),
            d["rollout"]["state"].as_str().unwrap_or("-"),
            d["stable"]["source"].as_str().unwrap_or("?"),
        );
    }
    Ok(())
}

/// A deployment's split as `version weight%, …` (the server's `traffic`).
pub(crate) fn traffic(d: &Value) -> String {
    let parts: Vec<String> = d["traffic"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| format!("{} {}%", t["version"].as_str().unwrap_or("?"), t["weight"]))
        .collect();
    parts.join(", ")
}

fn print_deployment(d: &Value) {
    let name = d["name"].as_str().unwrap_or("?");
    println!("{name}");
    for t in d["traffic"].as_array().into_iter().flatten() {
        let source = if t["role"] == "stable" { &d["stable"]["source"] } else { &d["rollout"]["to"]["source"] };
        println!(
            "  {:<7} {} {:<30} {:>3}%",
            t["role"].as_str().unwrap_or("?"),
            t["version"].as_str().unwrap_or("?"),
            source.as_str().unwrap_or("?"),
            t["weight"]
        );
    }
    if let Some(state) = d["rollout"]["state"].as_str() {
        println!("  rollout: {state}");
    }
    if let Some(last) = d["last_rollout"].as_object() {
        println!(
            "  last rollout: {} {}: {}",
            last["outcome"].as_str().unwrap_or("?"),
            last["to"].as_str().unwrap_or("?"),
            last["reason"].as_str().unwrap_or("?")
        );
    }
    if let Some(f) = d["follow"].as_object() {
        let error = f["error"].as_str().map(|e| format!(" (last check failed: {e})")).unwrap_or_default();
        println!("  follows {} every {} s{error}", f["reference"].as_str().unwrap_or("?"), f["interval_seconds"]);
    }
    let w = &d["window"];
    if !w.is_null() {
        for role in ["stable", "canary"] {
            let s = &w[role];
            let p95 = s["ttft_p95"].as_f64().map(|t| format!("{:.0} ms", t * 1e3)).unwrap_or_else(|| "-".into());
            println!(
                "  last {} s, {role}: {} requests, {} failed, TTFT p95 {p95}",
                w["seconds"], s["requests"], s["failed"]
            );
        }
    }
    if let Some(events) = d["events"].as_array() {
        println!("  events:");
        for e in events.iter().rev().take(8).collect::<Vec<_>>().into_iter().rev() {
            let at = e["at_ms"]
                .as_i64()
                .and_then(chrono::DateTime::from_timestamp_millis)
                .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_default();
            println!("    {at}  {}", e["text"].as_str().unwrap_or(""));
        }
    }
}
