use std::time::Duration;

use anyhow::bail;
use berth_server::{BatchingConfig, KeepAlive, LimitsByModel, MemoryConfig, ServerConfig};

use super::Context;

#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 12480)]
    port: u16,
    /// A model to load at start (repeatable); others load on their first request.
    #[arg(long = "model", value_name = "REF")]
    models: Vec<String>,
    /// The largest request body accepted, in bytes.
    #[arg(long, default_value_t = 2 << 20)]
    body_limit: usize,
    /// Worker threads for the engine (default: the physical cores available).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
    /// Requests each model generates for at once; more wait in its queue.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    max_running: u32,
    /// Tokens a batched step may run. Steps that carry running streams are sized by time instead
    /// (--target-itl); this bounds prompt-only steps.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65536))]
    max_batch_tokens: u32,
    /// The time between a stream's tokens to stay under, in milliseconds, where the machine allows:
    /// a new prompt's work joins the running streams' steps only up to it (and to at most doubling
    /// what their decodes alone take), and more streams join the running set past it only while a
    /// larger batch still raises throughput (others wait their turn). Step costs are measured as
    /// the model runs. 0: no target; steps take --max-batch-tokens and every request that fits runs.
    #[arg(long, value_name = "MS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    target_itl: u64,
    /// Requests that may wait for each model; beyond this they get 429 with Retry-After.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_queue: u32,
    /// Memory for each model's KV cache, e.g. 512MiB or 4GiB (capped at what --max-running
    /// requests at full context could use).
    #[arg(long, default_value = "2GiB", value_parser = parse_size)]
    kv_cache: u64,
    /// How the KV cache stores keys and values: f16 (as llama.cpp by default) or q8_0 (1.88× the
    /// positions in the same memory, at a small cost in agreement; ARCHITECTURE.md measures it).
    #[arg(long, default_value = "f16")]
    kv_type: berth_engine::model::KvType,
    /// Seconds a request may take from arrival to its last token (0: no limit).
    #[arg(long, default_value_t = 600)]
    request_timeout: u64,
    /// Limits of one model (repeatable): `REF=threads:N,max-running:N,context:N`, any of the three.
    /// `threads` gives the model workers of its own, so its steps run beside other models' instead
    /// of taking turns with them; `max-running` and `context` lower the server's settings for it.
    #[arg(long = "limit", value_name = "REF=LIMITS")]
    limits: Vec<String>,
    /// Do not reuse the KV cache of prompt prefixes shared between requests.
    #[arg(long)]
    no_prefix_cache: bool,
    /// Do not guess a request's next tokens from its own text (prompt-lookup speculative decoding;
    /// on by default where it pays, and answers are the same either way).
    #[arg(long)]
    no_speculation: bool,
    /// A fixed price for a guessed token, as a share of a step's time per stream, instead of the
    /// measured one. Hidden: only tests set it, so that the machine's load does not decide
    /// whether a test's stream guesses.
    #[arg(long, hide = true, value_parser = parse_share)]
    draft_cost: Option<f64>,
    /// Memory all loaded models may use together (weights, KV caches, working memory), e.g. 16GiB;
    /// idle models are unloaded to make room (default: three quarters of the machine's memory).
    #[arg(long, value_parser = parse_size)]
    memory_budget: Option<u64>,
    /// How long a model stays loaded after its last request, e.g. 5m, 1h, 0 (unload at once) or -1
    /// (for ever); a request's own keep_alive (Ollama's field) overrides it for that model.
    /// Models named with --model stay loaded (for ever) unless this is given.
    #[arg(long, value_parser = parse_keep_alive, allow_hyphen_values = true)]
    keep_alive: Option<KeepAlive>,
    /// A model that is never unloaded to make room or for being idle (repeatable).
    #[arg(long = "pin", value_name = "REF")]
    pinned: Vec<String>,
    /// A Host name a server on loopback answers to besides localhost's (repeatable). Other names
    /// get 403, which stops web pages reaching berth through DNS rebinding.
    #[arg(long = "allowed-host", value_name = "NAME")]
    allowed_hosts: Vec<String>,
    /// A web origin whose pages may call the API (repeatable; `http://localhost:*` allows any port,
    /// `*` any page). Pages of other origins get 403: a site the user visits cannot drive berth.
    #[arg(long = "allowed-origin", value_name = "ORIGIN", env = "BERTH_ORIGINS", value_delimiter = ',')]
    allowed_origins: Vec<String>,
    /// Do not serve the dashboard (`/` and `/ui` answer 404).
    #[arg(long)]
    no_ui: bool,
    /// Connections open at once; more get 503 and are closed.
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_connections: u64,
    /// Seconds a connection may wait to send a request's head (idle keep-alives included).
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    header_timeout: u64,
    /// Seconds a request's body may take to arrive.
    #[arg(long, value_name = "SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    body_timeout: u64,
    /// Listen on a non-loopback address without API keys. Anyone who can reach the port can use and
    /// manage the models: only behind something that guards it.
    #[arg(long)]
    allow_insecure_public: bool,
    /// Log lines as text or as JSON objects (one per line, for log collectors); `auto` writes text
    /// to a terminal and JSON anywhere else (a container's log, a file). What is logged is chosen
    /// with RUST_LOG (default `info`).
    #[arg(long, default_value = "auto", value_parser = ["auto", "text", "json"])]
    log_format: String,
    /// On SIGTERM or Ctrl-C, seconds the requests in flight may take to finish before berth exits.
    #[arg(long, default_value_t = 30)]
    drain_timeout: u64,
    /// Send every request's span to an OpenTelemetry collector over OTLP/HTTP (JSON), e.g.
    /// http://localhost:4318. A caller's W3C `traceparent` header puts the span in its trace.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// The service name exported spans carry.
    #[arg(long, env = "OTEL_SERVICE_NAME", default_value = "berth")]
    service_name: String,
    /// Seconds in a "day" of `--tokens-per-day` quotas. Hidden: only tests shorten it, to see a
    /// quota recover without waiting a day.
    #[arg(long, default_value_t = 86_400, hide = true, value_parser = clap::value_parser!(u64).range(1..))]
    token_quota_window: u64,
}

fn parse_keep_alive(text: &str) -> Result<KeepAlive, String> {
    KeepAlive::parse_str(text).ok_or_else(|| format!("`{text}` is not a duration; write e.g. 5m, 1h30m, 90s, 0 or -1"))
}

/// A share between 0 and 1.
fn parse_share(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("`{text}` is not a share between 0 and 1")),
    }
}

/// Three quarters of the machine's memory (from /proc/meminfo), or 8 GiB where it cannot be read.
fn default_memory_budget() -> u64 {
    let total_kb = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    });
    total_kb.map(|kb| kb * 1024 / 4 * 3).unwrap_or(8 << 30)
}

/// A size in bytes: a number with an optional unit (B, KB, MB, GB, KiB, MiB, GiB).
fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number.parse().map_err(|_| format!("`{text}` is not a size; write e.g. 512MiB or 4GiB"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        other => return Err(format!("unknown unit `{other}` in `{text}`; use B, KB, MB, GB, KiB, MiB or GiB")),
    };
    let bytes = number * scale as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > (1u64 << 50) as f64 {
        return Err(format!("`{text}` is out of range"));
    }
    Ok(bytes as u64)
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let exporter = crate::telemetry::init(&args.log_format, args.otlp_endpoint.as_deref(), &args.service_name)?;
    if let Some(n) = args.threads {
        berth_engine::set_threads(n.into())?;
    }
    if args.max_batch_tokens < args.max_running {
        bail!(
            "--max-batch-tokens ({}) must be at least --max-running ({}): every running request needs a token per step",
            args.max_batch_tokens,
            args.max_running
        );
    }
    let mut per_model = LimitsByModel::default();
    for spec in &args.limits {
        per_model.add(spec).map_err(|e| anyhow::anyhow!("--limit {e}"))?;
    }
    let config = ServerConfig {
        host: args.host,
        port: args.port,
        models: args.models,
        body_limit: args.body_limit,
        home: ctx.home.clone(),
        batching: BatchingConfig {
            max_running: args.max_running as usize,
            max_batch_tokens: args.max_batch_tokens as usize,
            max_queue: args.max_queue as usize,
            kv_cache_bytes: args.kv_cache,
            request_timeout: (args.request_timeout > 0).then(|| Duration::from_secs(args.request_timeout)),
            prefix_cache: !args.no_prefix_cache,
            kv_type: args.kv_type,
            speculation: !args.no_speculation,
            draft_cost: args.draft_cost,
            step_target: (args.target_itl > 0).then(|| berth_engine::scheduler::pacing::StepTarget {
                itl: Duration::from_millis(args.target_itl),
                ..Default::default()
            }),
            per_model,
        },
        memory: MemoryConfig {
            budget: args.memory_budget.unwrap_or_else(default_memory_budget),
            keep_alive: args.keep_alive.unwrap_or(KeepAlive::For(Duration::from_secs(300))),
            pinned: args.pinned,
        },
        allowed_hosts: args.allowed_hosts,
        allowed_origins: args.allowed_origins,
        ui: !args.no_ui,
        // What the operator names at start is expected to stay (as vLLM and Docker Model Runner
        // keep their preloaded models), unless --keep-alive says otherwise.
        preload_keep_alive: args.keep_alive.unwrap_or(KeepAlive::Forever),
        connections: berth_server::ConnectionLimits {
            max_connections: args.max_connections as usize,
            header_timeout: Duration::from_secs(args.header_timeout),
            body_timeout: Duration::from_secs(args.body_timeout),
        },
        allow_insecure_public: args.allow_insecure_public,
        drain_timeout: Duration::from_secs(args.drain_timeout),
        token_quota_window: Duration::from_secs(args.token_quota_window),
        shared_database: ctx.shared_database(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let served = runtime.block_on(berth_server::serve(config));
    // The last requests' spans go out before the process does.
    if let Some(exporter) = exporter {
        exporter.flush(Duration::from_secs(5));
    }
    served?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1.5GB"), Ok(1_500_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("3 parsecs").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("1e30GiB").is_err());
    }
}
