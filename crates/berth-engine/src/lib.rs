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

static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();

fn build_pool(n: usize) -> Result<rayon::ThreadPool, EngineError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("berth-worker-{i}"))
        .build()
        .map_err(|e| EngineError::BadModel(format!("cannot start the worker pool: {e}")))
}

/// Size the engine's persistent worker pool. Call once, before the first model runs; later calls
/// (and the default, one worker per CPU the process may use) keep the pool that exists.
pub fn set_threads(n: usize) -> Result<(), EngineError> {
    let pool = build_pool(n)?;
    let _ = POOL.set(pool);
    Ok(())
}

/// The worker pool every forward pass runs in: work is split by output rows across its threads,
/// and nothing is spawned per operation.
pub(crate) fn pool() -> &'static rayon::ThreadPool {
    POOL.get_or_init(|| {
        let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        build_pool(n).unwrap_or_else(|_| {
            // A pool of one thread cannot fail to start unless the process cannot create threads.
            rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a thread for the engine")
        })
    })
}

/// Workers in the engine's pool.
pub fn threads() -> usize {
    pool().current_num_threads()
}
