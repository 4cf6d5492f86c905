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
}

impl Context {
    pub fn store(&self) -> anyhow::Result<Store> {
        Store::open(&self.home).with_context(|| format!("cannot open the model store in {}", self.home.display()))
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
