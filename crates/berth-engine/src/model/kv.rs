//! Key/value storage in fixed-size blocks. A sequence's cache is a list of block numbers (its
//! block table), so sequences grow without copying, share blocks of a common prefix, and give
//! blocks back one by one. Which block belongs to whom is the scheduler's business
//! ([`crate::scheduler`]); this module only holds the bits.

/// Positions per block. Small enough that little of a block is wasted at the end of a sequence
/// and that prefixes are shared at a fine grain, large enough that block tables stay short.
pub const BLOCK_TOKENS: usize = 16;

/// Blocks that hold `tokens` positions.
pub fn blocks_for(tokens: usize) -> usize {
    tokens.div_ceil(BLOCK_TOKENS)
}

/// Keys and values of every layer for a number of blocks, as f16 bits (as llama.cpp stores them
/// by default).
pub struct KvStore {
    kv_dim: usize,
    blocks: usize,
    k: Vec<Vec<u16>>,
    v: Vec<Vec<u16>>,
}

impl KvStore {
    /// Storage for `blocks` blocks. The memory is zeroed lazily by the operating system, so a large
    /// pool costs address space until it is used. (Each layer is its own zeroed allocation:
    /// `vec![layer; n]` would clone the first layer's zeros into the others, writing every page.)
    pub fn new(layers: usize, kv_dim: usize, blocks: usize) -> Self {
        let per_layer = blocks * BLOCK_TOKENS * kv_dim;
        let zeroed = || (0..layers).map(|_| vec![0u16; per_layer]).collect();
        Self { kv_dim, blocks, k: zeroed(), v: zeroed() }
    }

    /// Bytes one block takes over all layers, keys and values.
    pub fn block_bytes(layers: usize, kv_dim: usize) -> usize {
        layers * 2 * BLOCK_TOKENS * kv_dim * std::mem::size_of::<u16>()
    }

    /// Block `block` of `layer`: keys and values, `BLOCK_TOKENS × kv_dim` each.
    pub fn block(&self, layer: usize, block: u32) -> (&[u16], &[u16]) {
        let size = BLOCK_TOKENS * self.kv_dim;
        let at = block as usize * size;
        (&self.k[layer][at..at + size], &self.v[layer][at..at + size])
    }

    /// Where position `slot` of `block` lies in `layer`: keys and values, `kv_dim` each.
    pub fn slot_mut(&mut self, layer: usize, block: u32, slot: usize) -> (&mut [u16], &mut [u16]) {
        let at = (block as usize * BLOCK_TOKENS + slot) * self.kv_dim;
        (&mut self.k[layer][at..at + self.kv_dim], &mut self.v[layer][at..at + self.kv_dim])
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
