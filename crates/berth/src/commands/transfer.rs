use berth_store::registry::{self, RegistryOptions};

use super::{Context, parse_ref};
use crate::progress;

#[derive(clap::Args)]
pub struct PullArgs {
    /// The model to fetch, e.g. ai/smollm2 or registry.example.com/team/model:v2.
    reference: String,
}

#[derive(clap::Args)]
pub struct PushArgs {
    /// The local model to send; its registry part says where.
    reference: String,
}

fn options(ctx: &Context) -> RegistryOptions {
    RegistryOptions { insecure_registries: ctx.insecure_registries.clone(), docker_config: None }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

pub fn pull(ctx: &Context, args: PullArgs) -> anyhow::Result<()> {
    let reference = parse_ref(&args.reference)?;
    let store = ctx.store()?;
    let bar = progress::for_terminal();
    let digest =
        runtime()?.block_on(registry::pull(&store, &reference, &options(ctx), bar, &berth_server::ModelVetting))?;
    println!("Pulled {} ({digest})", reference.familiar());
    Ok(())
}

pub fn push(ctx: &Context, args: PushArgs) -> anyhow::Result<()> {
    let reference = parse_ref(&args.reference)?;
    let store = ctx.store()?;
    let bar = progress::for_terminal();
    let digest = runtime()?.block_on(registry::push(&store, &reference, &options(ctx), bar))?;
    println!("Pushed {} ({digest})", reference.familiar());
    Ok(())
}
