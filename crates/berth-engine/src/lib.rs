//! berth's inference engine: llama-family GGUF models on CPU, with the tokenizer and chat template
//! read from the model file itself, sampling, and generation with stop strings and logprobs.
//!
//! The forward pass is batched from the start ([`model::LlamaModel::forward`] takes many sequences,
//! each with its own positions and KV cache), so the scheduler that serves many users builds on it
//! rather than replacing it.

pub mod error;
pub mod kernels;
pub mod model;
pub mod template;
pub mod tokenizer;

pub use error::EngineError;
pub mod generate;
pub mod sampling;
pub mod stop;

pub use generate::{Engine, FinishReason, GenerationOutput, GenerationRequest, TokenEvent};

/// Size the engine's worker pool (call once, before the first model runs). Default: one worker
/// per CPU the process may use.
pub fn set_threads(n: usize) -> Result<(), EngineError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("berth-worker-{i}"))
        .build_global()
        .map_err(|e| EngineError::BadModel(format!("cannot size the worker pool: {e}")))
}
