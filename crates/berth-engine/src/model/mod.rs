//! Models: loading weights from a memory-mapped GGUF file and running batched forward passes.

pub mod bert;
mod config;
pub mod kv;
mod llama;

pub use config::LlamaConfig;
pub use kv::{BLOCK_TOKENS, KvCache, KvStore, blocks_for};
pub use llama::{LlamaModel, Logits, SeqStep};
