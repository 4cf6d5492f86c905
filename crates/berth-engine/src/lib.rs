//! berth's inference engine: GGUF models on CPU behind one model seam ([`model::TextModel`]), with
//! the tokenizer and chat template read from the model file itself, sampling, and generation with
//! stop strings and logprobs.
//!
//! The forward pass is batched ([`model::TextModel::forward`] takes many sequences, each with its
//! own positions and block table in a KV pool the model owns), and [`scheduler`] serves many
//! requests at once with continuous batching on top of it; requests reach it validated
//! ([`request`]).

pub mod constraint;
pub mod error;
pub mod kernels;
pub mod model;
pub mod template;
pub mod tokenizer;

pub use error::EngineError;
pub mod generate;
pub mod reasoning;
pub mod request;
pub mod sampling;
pub mod scheduler;
pub mod stop;
mod team;
pub mod tools;

use team::Team;

pub use generate::{ChatOptions, Engine, chat_template_of, vet_artifact_template};
pub use request::{FinishReason, GenerationOutput, GenerationRequest, RequestDraft, RequestLimits, TokenEvent};

static TEAM: std::sync::OnceLock<std::sync::Arc<Team>> = std::sync::OnceLock::new();

thread_local! {
    /// A team of this thread's own (a model given its own threads), used instead of the shared one.
    static THREAD_TEAM: std::cell::RefCell<Option<std::sync::Arc<Team>>> = const { std::cell::RefCell::new(None) };
}

/// Size the engine's persistent worker team. Call once, before the first model runs; later calls
/// (and the default, one worker per physical core the process may use) keep the team that exists.
pub fn set_threads(n: usize) -> Result<(), EngineError> {
    if TEAM.get().is_none() {
        let team = Team::new(n).map_err(|e| EngineError::BadModel(format!("cannot start the worker threads: {e}")))?;
        let _ = TEAM.set(std::sync::Arc::new(team));
    }
    Ok(())
}

/// The worker team every forward pass runs on: work is split by output rows (or tokens) across
/// its threads, and nothing is spawned per operation. A thread that took a team of its own
/// ([`use_own_team`]) gets that one; every other thread shares the process's team.
pub(crate) fn team() -> std::sync::Arc<Team> {
    if let Some(own) = THREAD_TEAM.with_borrow(|t| t.clone()) {
        return own;
    }
    TEAM.get_or_init(|| {
        // A team of one is the caller alone and cannot fail to start.
        std::sync::Arc::new(
            Team::new(physical_cores()).unwrap_or_else(|_| Team::new(1).expect("a team of one spawns nothing")),
        )
    })
    .clone()
}

/// Give the calling thread a team of `n` workers (itself and `n - 1` threads) for every forward
/// pass it runs from now on, so that a model's work neither waits for nor slows down the other
/// models'. The threads end with the calling thread.
pub(crate) fn use_own_team(n: usize, name: &str) -> Result<(), EngineError> {
    let team = Team::named(n, name).map_err(|e| EngineError::BadConfig(format!("cannot start {n} threads: {e}")))?;
    THREAD_TEAM.with_borrow_mut(|t| *t = Some(std::sync::Arc::new(team)));
    Ok(())
}

/// Physical cores among the CPUs this process may run on: matrix kernels saturate a core's
/// vector units, so a second hyper-thread per core adds contention, not speed.
pub fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let siblings = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list")
        .map(|list| {
            list.trim()
                .split(',')
                .map(|part| match part.split_once('-') {
                    Some((a, b)) => b.parse::<usize>().unwrap_or(0).saturating_sub(a.parse().unwrap_or(0)) + 1,
                    None => 1,
                })
                .sum::<usize>()
        })
        .unwrap_or(1)
        .max(1);
    (logical / siblings).max(1)
}

/// Workers in the engine's team.
pub fn threads() -> usize {
    team().size()
}
