use std::path::PathBuf;

use berth_formats::gguf::GgufError;

/// Why a model cannot be loaded or run, said so a user can act on it.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a usable GGUF file: {source}")]
    Gguf { path: PathBuf, source: GgufError },
    #[error(
        "architecture {0:?} is not supported; berth runs llama (Llama 2/3, Mistral, SmolLM), qwen2, qwen3, qwen3moe, gemma2, gemma3 and phi3"
    )]
    UnsupportedArchitecture(String),
    #[error(
        "tensor type {0} is not supported; berth runs F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K"
    )]
    UnsupportedTensorType(String),
    #[error("the model file lacks tensor {0:?}")]
    MissingTensor(String),
    #[error("tensor {name:?} has shape {actual:?}, expected {expected:?}")]
    WrongShape { name: String, expected: Vec<u64>, actual: Vec<u64> },
    #[error("the model's metadata lacks {0:?}")]
    MissingMetadata(String),
    #[error("the model is malformed: {0}")]
    BadModel(String),
    #[error(
        "the prompt and answer need {needed} tokens but the context holds {limit} tokens; shorten the prompt or lower max_tokens"
    )]
    ContextOverflow { needed: usize, limit: usize },
    #[error("the tokenizer cannot be built from the model file: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("invalid sampling parameter: {0}")]
    Sampling(String),
    #[error("{message}")]
    InvalidParameter { param: String, message: String },
    #[error("invalid scheduler setting: {0}")]
    BadConfig(String),
    #[error(
        "the request needs {needed} tokens of KV cache but the whole cache holds {capacity}; shorten the prompt or give the cache more memory (--kv-cache)"
    )]
    KvCacheTooSmall { needed: usize, capacity: usize },
    #[error("the request did not finish within its time limit ({:.1} s)", .0.as_secs_f64())]
    TimedOut(std::time::Duration),
    #[error("{waiting} requests are already waiting for this model (the limit); retry shortly")]
    QueueFull { waiting: usize },
    /// A constrained answer cannot go on: the grammar reached a state it cannot leave (its work
    /// limit per token, or no token of the vocabulary fits).
    #[error("structured output: {0}")]
    Grammar(String),
    #[error("the model was unloaded while the request was waiting or running")]
    Stopped,
}
