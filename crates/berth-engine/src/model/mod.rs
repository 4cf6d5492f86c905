//! Models: the one seam every architecture (and, later, every device backend) implements —
//! [`TextModel`], a batched forward pass over sequences with their own positions and block tables,
//! whose keys and values live in a pool the model itself allocates ([`KvPool`]) — and the
//! architectures behind it.
//!
//! The scheduler sees only this trait: it decides which tokens of which sequences run in a step
//! and which cache blocks each sequence holds; the model decides how to compute them (kernels,
//! reduction orders, where the cache lives). Most families are one [`DecoderModel`] driven by
//! their [`Architecture`] description; one that does not fit is a type of its own implementing
//! [`TextModel`] and a line in [`load`].

pub mod bert;
mod config;
mod decoder;
pub mod kv;

use std::any::Any;
use std::path::Path;

use berth_formats::gguf::GgufFile;

use crate::error::EngineError;

pub use config::{Activation, Architecture, DecoderConfig, ExpertConfig, LayerAttention};
pub use decoder::DecoderModel;
pub use kv::{BLOCK_TOKENS, KvStore, KvType, blocks_for};

/// A text-generating model, as the scheduler, the engine and the benchmarks use it.
pub trait TextModel: Send + Sync {
    /// The GGUF architecture name (`llama`, `qwen2`, ...).
    fn architecture(&self) -> &str;
    fn vocab_size(&self) -> usize;
    /// Positions the model was trained for.
    fn context_length(&self) -> usize;
    /// Whether this model's cache can be stored as `kv_type` (q8_0 needs heads of a multiple of 32).
    fn supports_kv_type(&self, kv_type: KvType) -> bool;
    /// Bytes one cache block of [`BLOCK_TOKENS`] positions takes, over all layers.
    fn kv_block_bytes(&self, kv_type: KvType) -> usize;
    /// A pool of `blocks` cache blocks in the memory this model computes in (for the CPU, host
    /// memory, zeroed lazily by the operating system), storing rows as `kv_type`.
    fn new_kv_pool(&self, blocks: usize, kv_type: KvType) -> Result<Box<dyn KvPool>, EngineError>;
    /// Run one step: every sequence's new tokens, attending to what its blocks hold and storing
    /// their keys and values there. Returns, per sequence, the logits it asked for
    /// (`rows × vocab`). `pool` must be one this model made.
    fn forward(&self, pool: &mut dyn KvPool, steps: &[SeqStep<'_>]) -> Result<Vec<Vec<f32>>, EngineError>;
    /// The file's metadata: the tokenizer and the chat template are read from it.
    fn metadata(&self) -> &GgufFile;
}

/// Cache blocks owned by a model backend. The scheduler only counts them; their contents are the
/// backend's (a device backend keeps them on the device).
pub trait KvPool: Send {
    fn blocks(&self) -> usize;
    /// For the backend that made it, to reach its own type.
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// Which logits a sequence wants from a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None: a prompt chunk with more to come (the output layer is a large share of a small
    /// model's work, so it runs only where a token will be sampled).
    None,
    /// The last token's.
    Last,
    /// Every token's (teacher forcing, prompt logprobs).
    All,
}

/// One sequence's part of a batched step.
pub struct SeqStep<'a> {
    /// The sequence's block table, covering at least `start + tokens.len()` positions.
    pub blocks: &'a [u32],
    /// Positions already cached: the first new token's position.
    pub start: usize,
    pub tokens: &'a [u32],
    /// The length of the sequence's prompt: positions below it are prompt, the rest generated.
    /// A model may compute the two differently (berth's llama reproduces llama.cpp, which reduces
    /// a prompt of several tokens in another order than one token at a time); what it may not do
    /// is let a token's result depend on what else shares its step.
    pub prompt_len: usize,
    pub logits: Logits,
}

/// Open a GGUF model file with the architecture it names. An architecture berth does not run
/// fails here, naming it.
pub fn load(path: &Path) -> Result<Box<dyn TextModel>, EngineError> {
    Ok(Box::new(DecoderModel::load(path)?))
}

/// One sequence's cache with a pool of its own: for callers that run one sequence by hand
/// (teacher forcing, benchmarks of the bare forward pass). Serving goes through the scheduler's
/// shared pool.
pub struct SequenceCache {
    pool: Box<dyn KvPool>,
    blocks: Vec<u32>,
    len: usize,
    prompt_len: usize,
}

impl SequenceCache {
    /// A cache for up to the model's whole context (its memory is used only as it fills).
    pub fn new(model: &dyn TextModel) -> Result<SequenceCache, EngineError> {
        SequenceCache::with_kv_type(model, KvType::F16)
    }

    /// [`SequenceCache::new`] storing rows as `kv_type`.
    pub fn with_kv_type(model: &dyn TextModel, kv_type: KvType) -> Result<SequenceCache, EngineError> {
        let blocks = blocks_for(model.context_length()).max(1);
        let pool = model.new_kv_pool(blocks, kv_type)?;
        Ok(SequenceCache { pool, blocks: (0..blocks as u32).collect(), len: 0, prompt_len: 0 })
    }

    /// Tokens cached so far (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Run `tokens` next: several tokens are (part of) the prompt, one alone is generated. Returns
    /// the last token's logits, or every token's with `all_logits`.
    pub fn forward(
        &mut self,
        model: &dyn TextModel,
        tokens: &[u32],
        all_logits: bool,
    ) -> Result<Vec<f32>, EngineError> {
        if tokens.len() > 1 {
            self.prompt_len = self.prompt_len.max(self.len + tokens.len());
        }
        let step = SeqStep {
            blocks: &self.blocks,
            start: self.len,
            tokens,
            prompt_len: self.prompt_len,
            logits: if all_logits { Logits::All } else { Logits::Last },
        };
        let out = model.forward(self.pool.as_mut(), &[step])?.pop().unwrap_or_default();
        self.len += tokens.len();
        Ok(out)
    }
}
