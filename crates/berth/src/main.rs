//! The `berth` command line: a thin shell over berth's libraries.

mod commands;
mod progress;
mod table;
mod telemetry;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "berth", version, about = "Package, run, serve and operate generative AI models")]
struct Cli {
    /// berth's data folder (models, keys, usage).
    #[arg(long, global = true, env = "BERTH_HOME", value_name = "DIR")]
    home: Option<PathBuf>,
    /// A registry (host[:port]) that may be reached over plain HTTP; loopback registries always may.
    #[arg(
        long = "insecure-registry",
        global = true,
        value_name = "HOST",
        env = "BERTH_INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    insecure_registries: Vec<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Package a GGUF file or a safetensors folder as a model artifact in the local store.
    Package(commands::package::Args),
    /// Fetch a model from a registry into the local store.
    Pull(commands::transfer::PullArgs),
    /// Send a local model to a registry.
    Push(commands::transfer::PushArgs),
    /// Give a local model another name.
    Tag(commands::manage::TagArgs),
    /// List local models.
    #[command(alias = "ls")]
    List(commands::manage::ListArgs),
    /// Show a local model's manifest and config.
    Inspect(commands::manage::InspectArgs),
    /// Remove local models and the files nothing else uses.
    #[command(alias = "remove")]
    Rm(commands::manage::RmArgs),
    /// Show the store's disk usage.
    Df(commands::manage::DfArgs),
    /// Check local models' files against their digests.
    Verify(commands::manage::VerifyArgs),
    /// Remove files no model uses: unreferenced blobs, partial downloads, leftovers of killed writers.
    Prune(commands::manage::PruneArgs),
    /// Run a model: answer a prompt, or chat on a terminal.
    Run(commands::run::Args),
    /// Measure a model's prefill and decode speed on this machine.
    Bench(commands::bench::Args),
    /// Serve the OpenAI- and Ollama-compatible APIs.
    Serve(commands::serve::Args),
    /// Put one address in front of several `berth serve` replicas: each request goes to a replica
    /// chosen by prompt prefix and load, and is retried elsewhere when one fails before answering.
    Gateway(commands::gateway::Args),
    /// Show the models a running server holds in memory.
    Ps(commands::loaded::PsArgs),
    /// Unload a model from a running server.
    Unload(commands::loaded::UnloadArgs),
    /// Ask a running server whether it is up (exit status 0 when it answers /health).
    Health(commands::loaded::HealthArgs),
    /// Serve a model under a name clients call, pinned to its manifest (a running server's).
    Deploy(commands::deploy::DeployArgs),
    /// Move a deployment to a new version gradually: `rollout NAME --to MODEL`, then
    /// `rollout step|promote|abort|status|refresh NAME`.
    Rollout(commands::deploy::RolloutArgs),
    /// Go back to a deployment's previous version (or abort its rollout).
    Rollback(commands::deploy::NameArgs),
    /// List a running server's deployments and their traffic.
    Deployments(commands::deploy::ListArgs),
    /// Remove a deployment (its models stay in the store).
    Undeploy(commands::deploy::NameArgs),
    /// Manage API keys (once one exists, the server asks every request for one).
    #[command(subcommand, alias = "key")]
    Keys(commands::keys::KeyCommand),
    /// Show the requests and tokens each API key used, by model and day.
    Usage(commands::keys::UsageArgs),
    /// Render chat templates for another berth process (see berth_engine::template::sandbox).
    #[command(name = TEMPLATE_WORKER, hide = true)]
    TemplateWorker,
}

/// The hidden command a template worker process runs.
const TEMPLATE_WORKER: &str = "__template-worker";

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Chat templates come from registries: render them in worker processes with their own memory
    // limit, so that a hostile one cannot take this process down.
    match std::env::current_exe() {
        Ok(exe) => berth_engine::template::sandbox::use_worker_processes(exe, vec![TEMPLATE_WORKER.into()]),
        Err(e) => {
            eprintln!("berth: chat templates will render in this process (cannot find berth's own executable: {e})")
        }
    }
    let ctx = commands::Context {
        home: cli.home.unwrap_or_else(berth_store::Store::default_home),
        insecure_registries: cli.insecure_registries,
        // From the environment only: a connection string may carry a password, which a command
        // line would show to every user of the machine.
        shared_database: std::env::var("BERTH_DATABASE_URL").ok().filter(|u| !u.trim().is_empty()),
    };
    let result = match cli.command {
        Command::Package(a) => commands::package::run(&ctx, a),
        Command::Pull(a) => commands::transfer::pull(&ctx, a),
        Command::Push(a) => commands::transfer::push(&ctx, a),
        Command::Tag(a) => commands::manage::tag(&ctx, a),
        Command::List(a) => commands::manage::list(&ctx, a),
        Command::Inspect(a) => commands::manage::inspect(&ctx, a),
        Command::Rm(a) => commands::manage::rm(&ctx, a),
        Command::Df(a) => commands::manage::df(&ctx, a),
        Command::Verify(a) => commands::manage::verify(&ctx, a),
        Command::Prune(a) => commands::manage::prune(&ctx, a),
        Command::Run(a) => commands::run::run(&ctx, a),
        Command::Bench(a) => commands::bench::run(&ctx, a),
        Command::Serve(a) => commands::serve::run(&ctx, a),
        Command::Gateway(a) => commands::gateway::run(&ctx, a),
        Command::Ps(a) => commands::loaded::ps(a),
        Command::Unload(a) => commands::loaded::unload(a),
        Command::Health(a) => commands::loaded::health(a),
        Command::Deploy(a) => commands::deploy::deploy(a),
        Command::Rollout(a) => commands::deploy::rollout(a),
        Command::Rollback(a) => commands::deploy::rollback(a),
        Command::Deployments(a) => commands::deploy::list(a),
        Command::Undeploy(a) => commands::deploy::undeploy(a),
        Command::Keys(c) => commands::keys::key(&ctx, c),
        Command::Usage(a) => commands::keys::usage(&ctx, a),
        Command::TemplateWorker => {
            return ExitCode::from(berth_engine::template::sandbox::worker_main().clamp(0, 255) as u8);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, skipping causes whose text the message already holds
/// (many errors print their source as part of their own message).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}
