use berth_server::ServerConfig;

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
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    if let Some(n) = args.threads {
        berth_engine::set_threads(n.into())?;
    }
    let config = ServerConfig {
        host: args.host,
        port: args.port,
        models: args.models,
        body_limit: args.body_limit,
        home: ctx.home.clone(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(berth_server::serve(config))?;
    Ok(())
}
