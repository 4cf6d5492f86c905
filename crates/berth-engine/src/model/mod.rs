//! Models: loading weights from a memory-mapped GGUF file and running batched forward passes.

pub mod bert;
mod config;
mod llama;

pub use config::LlamaConfig;
pub use llama::{KvCache, LlamaModel, SeqStep};
