//! The block pool: which cache blocks are free, how many sequences hold each, and the prefix cache.
//!
//! A full block of prompt tokens is registered under a key: a hash of its tokens chained with the
//! key of the block before it, so a key names a whole prefix. A new sequence walks its prompt block
//! by block and takes a reference to every cached block that matches, stopping at the first miss.
//! Blocks nobody holds stay cached until a new allocation needs them, least recently used first.
//!
//! The hash is keyed per process (SipHash with random keys), so nobody outside can craft a prompt
//! that collides with another user's prefix, and a hit is confirmed against the stored tokens, so
//! not even a chance collision can hand a sequence someone else's keys and values.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};

use crate::model::BLOCK_TOKENS;

/// A full block's identity: its tokens chained with the key of the block before it.
pub type PrefixKey = u64;

struct Cached {
    key: PrefixKey,
    parent: Option<PrefixKey>,
    tokens: [u32; BLOCK_TOKENS],
}

pub struct BlockPool {
    /// Sequences holding each block.
    refs: Vec<u32>,
    /// The content a block is known by in the prefix cache, if it is registered.
    cached: Vec<Option<Cached>>,
    /// Blocks with no content worth keeping.
    free: Vec<u32>,
    by_key: HashMap<PrefixKey, u32>,
    /// Cached blocks nobody holds, by when they were last released (oldest first).
    idle: BTreeMap<u64, u32>,
    released_at: Vec<u64>,
    clock: u64,
    hasher: RandomState,
    prefix_cache: bool,
}

impl BlockPool {
    pub fn new(blocks: usize, prefix_cache: bool) -> Self {
        Self {
            refs: vec![0; blocks],
            cached: (0..blocks).map(|_| None).collect(),
            free: (0..blocks as u32).rev().collect(),
            by_key: HashMap::new(),
            idle: BTreeMap::new(),
            released_at: vec![0; blocks],
            clock: 0,
            hasher: RandomState::new(),
            prefix_cache,
        }
    }

    pub fn total(&self) -> usize {
        self.refs.len()
    }

    /// Blocks an allocation can take: free ones and cached ones nobody holds.
    pub fn available(&self) -> usize {
        self.free.len() + self.idle.len()
    }

    /// Blocks held by sequences.
    pub fn in_use(&self) -> usize {
        self.total() - self.available()
    }

    /// Take a block, evicting the least recently used idle cached block when none is free.
    pub fn allocate(&mut self) -> Option<u32> {
        let block = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.idle.pop_first()?;
                if let Some(c) = self.cached[b as usize].take() {
                    self.by_key.remove(&c.key);
                }
                b
            }
        };
        self.refs[block as usize] = 1;
        Some(block)
    }

    /// Give a block back. A cached block stays findable until an allocation needs it.
    pub fn release(&mut self, block: u32) {
        let b = block as usize;
        debug_assert!(self.refs[b] > 0, "block {block} released more often than taken");
        self.refs[b] = self.refs[b].saturating_sub(1);
        if self.refs[b] == 0 {
            if self.cached[b].is_some() {
                self.clock += 1;
                self.released_at[b] = self.clock;
                self.idle.insert(self.clock, block);
            } else {
                self.free.push(block);
            }
        }
    }

    fn key(&self, parent: Option<PrefixKey>, tokens: &[u32]) -> PrefixKey {
        self.hasher.hash_one((parent, tokens))
    }

    /// Take a reference to the cached block holding `tokens` (a full block) after the prefix
    /// `parent`, returning it and its key.
    pub fn lookup(&mut self, parent: Option<PrefixKey>, tokens: &[u32]) -> Option<(u32, PrefixKey)> {
        if !self.prefix_cache {
            return None;
        }
        let key = self.key(parent, tokens);
        let &block = self.by_key.get(&key)?;
        let b = block as usize;
        let c = self.cached[b].as_ref()?;
        if c.parent != parent || c.tokens[..] != *tokens {
            return None;
        }
        if self.refs[b] == 0 {
            self.idle.remove(&self.released_at[b]);
        }
        self.refs[b] += 1;
        Some((block, key))
    }

    /// Make a full block that holds `tokens` after the prefix `parent` findable, returning its key
    /// (for the next block's chain). If another block already holds the same prefix, this one
    /// stays private and is freed when its sequence ends.
    pub fn register(&mut self, block: u32, parent: Option<PrefixKey>, tokens: &[u32]) -> PrefixKey {
        let key = self.key(parent, tokens);
        if !self.prefix_cache || self.by_key.contains_key(&key) {
            return key;
        }
        let Ok(tokens) = <[u32; BLOCK_TOKENS]>::try_from(tokens) else {
            return key;
        };
        self.by_key.insert(key, block);
        self.cached[block as usize] = Some(Cached { key, parent, tokens });
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(first: u32) -> Vec<u32> {
        (first..first + BLOCK_TOKENS as u32).collect()
    }

    #[test]
    fn a_registered_prefix_is_found_and_shared() {
        let mut pool = BlockPool::new(4, true);
        let a = pool.allocate().unwrap();
        let b = pool.allocate().unwrap();
        let ka = pool.register(a, None, &block(0));
        pool.register(b, Some(ka), &block(100));
        assert_eq!(pool.lookup(None, &block(0)), Some((a, ka)));
        assert_eq!(pool.lookup(Some(ka), &block(100)).map(|x| x.0), Some(b));
        // The same tokens after another prefix are another block.
        assert_eq!(pool.lookup(None, &block(100)), None);
        assert_eq!(pool.in_use(), 2);
        for x in [a, a, b, b] {
            pool.release(x);
        }
        assert_eq!(pool.in_use(), 0);
        assert_eq!(pool.available(), 4);
    }

    #[test]
    fn idle_cached_blocks_are_evicted_oldest_first() {
        let mut pool = BlockPool::new(2, true);
        let a = pool.allocate().unwrap();
        let b = pool.allocate().unwrap();
        pool.register(a, None, &block(0));
        let kb = pool.register(b, None, &block(50));
        pool.release(a);
        pool.release(b);
        assert_eq!(pool.allocate(), Some(a), "the least recently released goes first");
        assert_eq!(pool.lookup(None, &block(0)), None, "evicted blocks are forgotten");
        assert_eq!(pool.lookup(None, &block(50)), Some((b, kb)));
        assert_eq!(pool.allocate(), None, "every block is held");
    }

    #[test]
    fn without_the_prefix_cache_nothing_is_found() {
        let mut pool = BlockPool::new(2, false);
        let a = pool.allocate().unwrap();
        pool.register(a, None, &block(0));
        assert_eq!(pool.lookup(None, &block(0)), None);
        pool.release(a);
        assert_eq!(pool.available(), 2);
    }
}
