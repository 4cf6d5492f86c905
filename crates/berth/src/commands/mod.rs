pub mod bench;
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
