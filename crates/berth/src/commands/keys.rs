//! `berth keys create|list|revoke` and `berth usage`: API keys and what they used, read from and
//! written to the accounts database in berth's home (the server picks changes up at once).

use anyhow::Context as _;
use berth_server::accounts::{GroupBy, KeySpec, Scope, model_pattern};

use super::Context;

#[derive(clap::Subcommand)]
pub enum KeyCommand {
    /// Make a key; its secret is printed once.
    Create {
        /// A name to recognise the key by (who or what uses it).
        #[arg(long)]
        name: String,
        /// What the key may do: inference (generate, embed, list models), metrics (scrape /metrics),
        /// admin (everything, pull and delete included). Repeatable; default inference.
        #[arg(long = "scope", value_name = "SCOPE")]
        scopes: Vec<String>,
        /// Requests per minute the key may send (default: no limit); more get 429 with Retry-After.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        rpm: Option<u32>,
        /// Prompt and completion tokens the key may use in a rolling day (default: no limit); once
        /// used up, requests get 429 with Retry-After. A request running when the quota runs out
        /// finishes.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        tokens_per_day: Option<u64>,
        /// The models the key may use, comma-separated names or prefixes ending in `*`
        /// (`ai/smollm2,team/*`); default: every model. Others are hidden from it and refused
        /// with 403.
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        /// Take the key's secret from this environment variable instead of drawing one (16 to 256
        /// visible characters): a key clients already have, like vLLM's and llama.cpp's
        /// --api-key. Not printed back.
        #[arg(long, value_name = "VAR")]
        secret_env: Option<String>,
    },
    /// List the keys (never their secrets).
    List,
    /// Revoke a key by its id; requests with it are refused from then on.
    Revoke { id: String },
}

#[derive(clap::Args)]
pub struct UsageArgs {
    /// Group by API key or by model.
    #[arg(long, default_value = "key", value_parser = ["key", "model"])]
    by: String,
    /// First day to include, YYYY-MM-DD (default: the last 30 days).
    #[arg(long)]
    since: Option<String>,
    /// Print CSV.
    #[arg(long, conflicts_with = "json")]
    csv: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn day(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0).map(|d| d.format("%Y-%m-%d %H:%M").to_string()).unwrap_or_default()
}

pub fn key(ctx: &Context, command: KeyCommand) -> anyhow::Result<()> {
    let accounts = ctx.accounts()?;
    match command {
        KeyCommand::Create { name, scopes, rpm, tokens_per_day, models, secret_env } => {
            let scopes = if scopes.is_empty() { vec!["inference".to_string()] } else { scopes };
            let spec = KeySpec {
                scopes: scopes.iter().map(|s| Scope::parse(s)).collect::<Result<Vec<_>, _>>()?,
                requests_per_minute: rpm,
                tokens_per_day,
                models: models.iter().map(|m| model_pattern(m)).collect::<Result<Vec<_>, _>>()?,
            };
            match secret_env {
                Some(var) => {
                    let secret = std::env::var(&var).with_context(|| {
                        format!("--secret-env {var}: the environment variable {var} is not set (or not UTF-8)")
                    })?;
                    let (key, _) = accounts.create_key_with_secret(&name, &spec, &secret)?;
                    eprintln!("Created {} ({name}) with the secret in {var}.", key.id);
                }
                None => {
                    let (key, secret) = accounts.create_key(&name, &spec)?;
                    println!("{secret}");
                    eprintln!(
                        "Created {} ({name}). The secret above is shown only now: keep it somewhere safe.",
                        key.id
                    );
                }
            }
        }
        KeyCommand::List => {
            println!(
                "{:<18} {:<20} {:<26} {:>8} {:>12} {:<24} {:<17} REVOKED",
                "ID", "NAME", "SCOPES", "RPM", "TOKENS/DAY", "MODELS", "CREATED"
            );
            let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
            for k in accounts.list_keys()? {
                let scopes: Vec<&str> = k.scopes.iter().map(|s| s.name()).collect();
                println!(
                    "{:<18} {:<20} {:<26} {:>8} {:>12} {:<24} {:<17} {}",
                    k.id,
                    k.name,
                    scopes.join(","),
                    or_dash(k.requests_per_minute.map(|r| r.to_string())),
                    or_dash(k.tokens_per_day.map(|t| t.to_string())),
                    if k.models.is_empty() { "all".to_string() } else { k.models.join(",") },
                    day(k.created),
                    k.revoked.map(day).unwrap_or_else(|| "-".into())
                );
            }
        }
        KeyCommand::Revoke { id } => {
            accounts.revoke(&id)?;
            println!("Revoked {id}");
        }
    }
    Ok(())
}

pub fn usage(ctx: &Context, args: UsageArgs) -> anyhow::Result<()> {
    let since = match &args.since {
        Some(s) => chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .with_context(|| format!("--since {s:?} is not YYYY-MM-DD"))?
            .and_hms_opt(0, 0, 0)
            .map(|t| t.and_utc().timestamp())
            .unwrap_or(0),
        None => (chrono::Utc::now() - chrono::Duration::days(30)).timestamp(),
    };
    let by = if args.by == "model" { GroupBy::Model } else { GroupBy::Key };
    let rows = ctx.accounts()?.usage(since, by)?;
    if args.json {
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(());
    }
    // Column names in the order of `UsageRow::counts`; the table's widths fit its headings.
    let counts =
        ["requests", "completed", "length", "aborted", "rejected", "failed", "prompt_tokens", "completion_tokens"];
    let headings = ["REQUESTS", "COMPLETED", "LENGTH", "ABORTED", "REJECTED", "FAILED", "PROMPT", "COMPLETION"];
    let widths = [8, 9, 7, 7, 8, 6, 10, 10];
    if args.csv {
        println!("{},name,{}", args.by, counts.join(","));
        for r in &rows {
            let values: Vec<String> = r.counts().iter().map(u64::to_string).collect();
            println!("{},\"{}\",{}", r.group, r.name.replace('"', "\"\""), values.join(","));
        }
        return Ok(());
    }
    let line = |group: &str, name: &str, cells: Vec<String>| {
        let cells: Vec<String> = cells.iter().zip(widths).map(|(c, w)| format!("{c:>w$}")).collect();
        println!("{group:<24} {name:<14} {}", cells.join(" "));
    };
    line(&args.by.to_uppercase(), "NAME", headings.iter().map(|h| h.to_string()).collect());
    for r in &rows {
        line(&r.group, &r.name, r.counts().iter().map(u64::to_string).collect());
    }
    Ok(())
}
