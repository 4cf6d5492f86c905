//! Key/value storage in fixed-size blocks. A sequence's cache is a list of block numbers (its
//! block table), so sequences grow without copying, share blocks of a common prefix, and give
//! blocks back one by one. Which block belongs to whom is the scheduler's business
//! ([`crate::scheduler`]); this module only holds the bits.

pub use crate::kernels::kv_type::KvType;

/// Positions per block. Small enough that little of a block is wasted at the end of a sequence
/// and that prefixes are shared at a fine grain, large enough that block tables stay short.
pub const BLOCK_TOKENS: usize = 16;

/// Blocks that hold `tokens` positions.
pub fn blocks_for(tokens: usize) -> usize {
    tokens.div_ceil(BLOCK_TOKENS)
}

/// Keys and values of every layer for a number of blocks, each row stored as its [`KvType`].
pub struct KvStore {
    kv_type: KvType,
    /// Values in one row (one position of one layer's keys or values).
    kv_dim: usize,
    /// u16 words one row takes.
    row_words: usize,
    blocks: usize,
    k: Vec<Vec<u16>>,
    v: Vec<Vec<u16>>,
}

impl KvStore {
    /// Storage for `blocks` blocks. The memory is zeroed lazily by the operating system, so a large
    /// pool costs address space until it is used. (Each layer is its own zeroed allocation:
    /// `vec![layer; n]` would clone the first layer's zeros into the others, writing every page.)
    /// Rows of q8_0 are whole blocks of 32 values: `kv_dim` must be a multiple of 32.
    pub fn new(layers: usize, kv_dim: usize, blocks: usize, kv_type: KvType) -> Self {
        let row_words = kv_type.row_words(kv_dim);
        let per_layer = blocks * BLOCK_TOKENS * row_words;
        let zeroed = || (0..layers).map(|_| vec![0u16; per_layer]).collect();
        Self { kv_type, kv_dim, row_words, blocks, k: zeroed(), v: zeroed() }
    }

    /// Bytes one block takes over all layers, keys and values.
    pub fn block_bytes(layers: usize, kv_dim: usize, kv_type: KvType) -> usize {
        layers * 2 * BLOCK_TOKENS * kv_type.row_words(kv_dim) * std::mem::size_of::<u16>()
    }

    pub fn kv_type(&self) -> KvType {
        self.kv_type
    }

    /// Block `block` of `layer`: keys and values, `BLOCK_TOKENS` rows each.
    pub fn block(&self, layer: usize, block: u32) -> (&[u16], &[u16]) {
        let size = BLOCK_TOKENS * self.row_words;
        let at = block as usize * size;
        (&self.k[layer][at..at + size], &self.v[layer][at..at + size])
    }

    /// Store the keys and values (`kv_dim` each) of position `slot` of `block` in `layer`.
    pub fn write(&mut self, layer: usize, block: u32, slot: usize, k: &[f32], v: &[f32]) {
        let at = (block as usize * BLOCK_TOKENS + slot) * self.row_words;
        let range = at..at + self.row_words;
        self.kv_type.encode(&k[..self.kv_dim], &mut self.k[layer][range.clone()]);
        self.kv_type.encode(&v[..self.kv_dim], &mut self.v[layer][range]);
    }
}

impl super::KvPool for KvStore {
    fn blocks(&self) -> usize {
        self.blocks
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}
