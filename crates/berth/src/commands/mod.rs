pub mod bench;
mod bench_serve;
pub mod deploy;
pub mod gateway;
pub mod keys;
pub mod loaded;
pub mod manage;
pub mod package;
pub mod run;
pub mod serve;
pub mod transfer;

use std::path::PathBuf;

use anyhow::Context as _;
use berth_store::{Reference, Store};

/// What every command needs from the global options.
pub struct Context {
    pub home: PathBuf,
    pub insecure_registries: Vec<String>,
    /// `BERTH_DATABASE_URL`: a PostgreSQL database for keys, usage, quotas and deployments shared
    /// by several servers and gateways; unset, they are in SQLite in the home.
    pub shared_database: Option<String>,
}

impl Context {
    pub fn store(&self) -> anyhow::Result<Store> {
        Store::open(&self.home).with_context(|| format!("cannot open the model store in {}", self.home.display()))
    }

    /// The accounts database: the shared one `BERTH_DATABASE_URL` names, or the home's.
    pub fn accounts(&self) -> anyhow::Result<berth_server::accounts::Accounts> {
        berth_server::accounts::Accounts::open_at(&self.home, self.shared_database.as_deref()).with_context(|| {
            match self.shared_database {
                Some(_) => "cannot open berth's accounts in the database BERTH_DATABASE_URL names (is it running and reachable? unset the variable to use the home's own)",
                None => "cannot open berth's accounts",
            }
        })
    }

    /// The shared accounts database for a server's configuration.
    pub fn shared_database(&self) -> Option<berth_server::Secret> {
        self.shared_database.clone().map(berth_server::Secret)
    }
}

pub fn parse_ref(s: &str) -> anyhow::Result<Reference> {
    Ok(Reference::parse(s)?)
}

/// A model to run: a path to a .gguf file, or a reference in the local store (whose chat-template
/// layer, if any, overrides the file's template).
pub fn load_engine(ctx: &Context, model: &str) -> anyhow::Result<berth_engine::Engine> {
    let path = PathBuf::from(model);
    if path.is_file() {
        return berth_engine::Engine::load(&path, None).with_context(|| format!("cannot load {model}"));
    }
    let reference = parse_ref(model)?;
    let found = ctx.store()?.gguf_model(&reference)?;
    berth_engine::Engine::load(&found.path, found.chat_template.as_deref())
        .with_context(|| format!("cannot load {}", reference.familiar()))
}
