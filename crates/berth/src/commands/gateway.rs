use std::time::Duration;

use anyhow::{Context as _, bail};
use berth_server::gateway::{GatewayConfig, RemoteConfig, Secret, route::Policy};

#[derive(clap::Args)]
pub struct Args {
    /// A replica, e.g. http://10.0.0.5:12480 (repeatable).
    #[arg(long = "upstream", value_name = "URL")]
    upstreams: Vec<String>,
    /// Replicas found by DNS, `dns:NAME:PORT`: every address NAME resolves to (a Compose service,
    /// a Kubernetes headless Service), looked up again every 5 s.
    #[arg(long, value_name = "dns:NAME:PORT")]
    upstreams_from: Option<String>,
    /// The environment variable holding a key the gateway polls the replicas' `/load` with, when
    /// they have keys (a key with the `metrics` scope). Clients' own keys go with their requests.
    #[arg(long, value_name = "VAR")]
    upstream_key_env: Option<String>,
    /// A remote OpenAI-compatible endpoint (another berth, a bigger server, a cloud API) that takes
    /// OpenAI-API requests when every replica is saturated, none is ready, or none has the model,
    /// e.g. https://api.example.com or http://10.0.1.9:12480.
    #[arg(long, value_name = "URL")]
    remote: Option<String>,
    /// The environment variable holding the remote's key (sent in place of the client's own; never
    /// logged).
    #[arg(long, value_name = "VAR", requires = "remote")]
    remote_key_env: Option<String>,
    /// A model's name at the remote, `LOCAL=REMOTE` (repeatable); others keep their names.
    #[arg(long = "remote-model", value_name = "LOCAL=REMOTE", requires = "remote")]
    remote_models: Vec<String>,
    /// Requests a replica holds (running, waiting or sent by the gateway) at which it counts as
    /// saturated; when every replica is, requests overflow to --remote.
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    overflow_at: u32,
    /// Requests that may wait at the gateway while every replica runs as many of its requests as
    /// it can at once (turns go round the API keys); more get 429 with Retry-After.
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_queue: u32,
    /// Seconds a request may wait in that queue before it gets 429.
    #[arg(long, value_name = "SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    queue_timeout: u64,
    /// How requests are spread: `balanced` (prefix affinity within a bound on load, then model
    /// affinity and least load) or `round-robin` (to compare against).
    #[arg(long, default_value = "balanced", value_parser = ["balanced", "round-robin"])]
    routing: String,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 12400)]
    port: u16,
    /// Milliseconds between polls of every replica's load.
    #[arg(long, value_name = "MS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    poll_interval: u64,
    /// The largest request body accepted, in bytes.
    #[arg(long, default_value_t = 2 << 20)]
    body_limit: usize,
    /// Connections open at once; more get 503 and are closed.
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_connections: u64,
    /// A Host name a gateway on loopback answers to besides localhost's (repeatable).
    #[arg(long = "allowed-host", value_name = "NAME")]
    allowed_hosts: Vec<String>,
    /// A web origin whose pages may call through the gateway (repeatable; `http://localhost:*`
    /// allows any port, `*` any page). Pages of other origins get 403; the gateway's own
    /// dashboard (/ui) needs none.
    #[arg(long = "allowed-origin", value_name = "ORIGIN", env = "BERTH_ORIGINS", value_delimiter = ',')]
    allowed_origins: Vec<String>,
    /// Do not serve the dashboard (`/` and `/ui` go to the replicas like any other path).
    #[arg(long)]
    no_ui: bool,
    /// Listen on a non-loopback address. Requests are forwarded with their keys, which the replicas
    /// check when they have keys; without keys anyone who reaches the port uses the replicas.
    #[arg(long)]
    allow_insecure_public: bool,
    /// On SIGTERM or Ctrl-C, seconds the answers in flight may take to finish.
    #[arg(long, default_value_t = 30)]
    drain_timeout: u64,
    /// Log lines as text or as JSON objects; `auto` writes text to a terminal and JSON elsewhere.
    #[arg(long, default_value = "auto", value_parser = ["auto", "text", "json"])]
    log_format: String,
}

/// `dns:NAME:PORT` → (NAME, PORT).
fn parse_discovery(spec: &str) -> anyhow::Result<(String, u16)> {
    let rest = spec.strip_prefix("dns:").context("--upstreams-from takes dns:NAME:PORT, e.g. dns:berth:12480")?;
    let (name, port) = rest.rsplit_once(':').context("--upstreams-from needs a port: dns:NAME:PORT")?;
    let port: u16 = port.parse().with_context(|| format!("`{port}` in --upstreams-from is not a port"))?;
    if name.is_empty() {
        bail!("--upstreams-from needs a name: dns:NAME:PORT");
    }
    Ok((name.to_string(), port))
}

pub fn run(ctx: &super::Context, args: Args) -> anyhow::Result<()> {
    crate::telemetry::init(&args.log_format, None, "berth-gateway")?;
    let discover = args.upstreams_from.as_deref().map(parse_discovery).transpose()?;
    let upstream_key = match &args.upstream_key_env {
        Some(var) => Some(Secret(std::env::var(var).with_context(|| {
            format!("--upstream-key-env names {var}, which is not set: export the replicas' key in it")
        })?)),
        None => None,
    };
    let remote = match args.remote {
        Some(url) => {
            let key = match &args.remote_key_env {
                Some(var) => Some(Secret(std::env::var(var).with_context(|| {
                    format!("--remote-key-env names {var}, which is not set: export the remote's key in it")
                })?)),
                None => None,
            };
            let mut models = Vec::new();
            for spec in &args.remote_models {
                let (local, remote) =
                    spec.split_once('=').filter(|(l, r)| !l.is_empty() && !r.is_empty()).with_context(|| {
                        format!("--remote-model takes LOCAL=REMOTE, e.g. smollm2=gpt-4o-mini; got `{spec}`")
                    })?;
                models.push((local.to_string(), remote.to_string()));
            }
            Some(RemoteConfig { url, key, models, overflow_at: f64::from(args.overflow_at) })
        }
        None => None,
    };
    let config = GatewayConfig {
        host: args.host,
        port: args.port,
        upstreams: args.upstreams,
        discover,
        upstream_key,
        policy: if args.routing == "round-robin" { Policy::RoundRobin } else { Policy::Balanced },
        poll_interval: Duration::from_millis(args.poll_interval),
        body_limit: args.body_limit,
        connections: berth_server::ConnectionLimits {
            max_connections: args.max_connections as usize,
            ..Default::default()
        },
        drain_timeout: Duration::from_secs(args.drain_timeout),
        allow_insecure_public: args.allow_insecure_public,
        allowed_hosts: args.allowed_hosts,
        allowed_origins: args.allowed_origins,
        ui: !args.no_ui,
        remote,
        home: ctx.home.clone(),
        token_quota_window: Duration::from_secs(86_400),
        shared_database: ctx.shared_database(),
        max_queue: args.max_queue as usize,
        queue_timeout: Duration::from_secs(args.queue_timeout),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(berth_server::gateway::serve(config))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_discovery;

    #[test]
    fn discovery_specs() {
        assert_eq!(parse_discovery("dns:berth:12480").unwrap(), ("berth".to_string(), 12480));
        assert!(parse_discovery("berth:12480").is_err());
        assert!(parse_discovery("dns:berth").is_err());
        assert!(parse_discovery("dns::1").is_err());
    }
}
