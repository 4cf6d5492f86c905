//! BPE by the ranks of `tokenizer.ggml.merges`, in two flavours: GPT-2 style byte-level BPE (text
//! bytes mapped to printable characters first) and SentencePiece-style BPE (Gemma 4: spaces
//! written as `▁`, merges over raw UTF-8, unknown bytes as `<0xXX>` tokens). A priority queue over a
//! linked list of symbols keeps encoding O(n log n) even for long pieces.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use super::pretokenize::PreTokenizer;
use super::symbols::{self, Symbol};
use crate::error::EngineError;

pub struct Bpe {
    vocab: HashMap<String, u32>,
    ranks: HashMap<(String, String), u32>,
    byte_to_char: [char; 256],
    char_to_byte: HashMap<char, u8>,
    pre: PreTokenizer,
    /// GPT-2's byte-level mapping; without it, SentencePiece-style (see the module's doc).
    byte_level: bool,
}

/// SentencePiece's visible space.
const SPACE: char = '\u{2581}';

/// GPT-2's reversible byte → character map: printable bytes map to themselves, the rest to U+0100+.
fn byte_chars() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        map[b as usize] = if printable {
            b as char
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('?')
        };
    }
    map
}

impl Bpe {
    pub fn new(tokens: &[String], merges: &[String], pre: PreTokenizer) -> Result<Self, EngineError> {
        let mut ranks = HashMap::with_capacity(merges.len());
        for (rank, m) in merges.iter().enumerate() {
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| EngineError::Tokenizer(format!("merge {rank} ({m:?}) is not two symbols")))?;
            ranks.entry((a.to_string(), b.to_string())).or_insert(rank as u32);
        }
        let byte_to_char = byte_chars();
        let char_to_byte = byte_to_char.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        Ok(Self { vocab: super::index(tokens), ranks, byte_to_char, char_to_byte, pre, byte_level: true })
    }

    /// SentencePiece-style BPE (`tokenizer.ggml.model` `gemma4`): no word splitting, only lines.
    pub fn sentencepiece_style(tokens: &[String], merges: &[String]) -> Result<Self, EngineError> {
        Ok(Self { byte_level: false, ..Self::new(tokens, merges, PreTokenizer::named("gemma4")?)? })
    }

    pub fn encode(&self, text: &str, out: &mut Vec<u32>) {
        if !self.byte_level {
            let text = text.replace(' ', "\u{2581}");
            for piece in self.pre.split(&text) {
                // A run of newlines that is a token is that token (as llama.cpp does for Gemma 4).
                if piece.bytes().all(|b| b == b'\n')
                    && let Some(&id) = self.vocab.get(piece)
                {
                    out.push(id);
                    continue;
                }
                self.merge(piece, out);
            }
            return;
        }
        for piece in self.pre.split(text) {
            let mapped: String = piece.bytes().map(|b| self.byte_to_char[b as usize]).collect();
            if let Some(&id) = self.vocab.get(&mapped) {
                out.push(id);
                continue;
            }
            self.merge(&mapped, out);
        }
    }

    fn rank(&self, word: &str, a: &Symbol, b: &Symbol) -> Option<u32> {
        let left = &word[a.start..a.start + a.len];
        let right = &word[b.start..b.start + b.len];
        self.ranks.get(&(left.to_string(), right.to_string())).copied()
    }

    fn merge(&self, word: &str, out: &mut Vec<u32>) {
        let mut symbols = symbols::from_chars(word);
        // (rank, left index, size of the merged text) — lowest rank first, then leftmost.
        let mut queue = BinaryHeap::new();
        for i in 1..symbols.len() {
            if let Some(r) = self.rank(word, &symbols[i - 1], &symbols[i]) {
                queue.push(Reverse((r, i - 1, symbols[i - 1].len + symbols[i].len)));
            }
        }
        while let Some(Reverse((_, left, size))) = queue.pop() {
            let Some(right) = symbols[left].next else { continue };
            // Skip stale entries: one side was merged away or changed since this pair was queued.
            if !symbols::still_valid(&symbols, left, right, size) {
                continue;
            }
            symbols::merge(&mut symbols, left, right);
            if let Some(p) = symbols[left].prev
                && let Some(r) = self.rank(word, &symbols[p], &symbols[left])
            {
                queue.push(Reverse((r, p, symbols[p].len + symbols[left].len)));
            }
            if let Some(n) = symbols[left].next
                && let Some(r) = self.rank(word, &symbols[left], &symbols[n])
            {
                queue.push(Reverse((r, left, symbols[left].len + symbols[n].len)));
            }
        }
        let mut at = Some(0);
        while let Some(i) = at {
            let s = symbols[i];
            let text = &word[s.start..s.start + s.len];
            match self.vocab.get(text) {
                Some(&id) => out.push(id),
                // A merge result missing from the vocabulary: fall back to its characters, or, for
                // SentencePiece-style vocabularies, to its bytes' `<0xXX>` tokens.
                None if self.byte_level => {
                    for c in text.chars() {
                        if let Some(&id) = self.vocab.get(c.encode_utf8(&mut [0; 4]) as &str) {
                            out.push(id);
                        }
                    }
                }
                None => {
                    for b in text.bytes() {
                        if let Some(&id) = self.vocab.get(&format!("<0x{b:02X}>")) {
                            out.push(id);
                        }
                    }
                }
            }
            at = s.next;
        }
    }

    /// The bytes a vocabulary entry stands for.
    pub fn token_bytes(&self, text: &str) -> Vec<u8> {
        if !self.byte_level {
            if let Some(hex) = text.strip_prefix("<0x").and_then(|t| t.strip_suffix('>'))
                && hex.len() == 2
                && let Ok(b) = u8::from_str_radix(hex, 16)
            {
                return vec![b];
            }
            return text.replace(SPACE, " ").into_bytes();
        }
        text.chars()
            .map(|c| match self.char_to_byte.get(&c) {
                Some(&b) => vec![b],
                // Not a byte-level character (an added token's text): its UTF-8 as is.
                None => c.to_string().into_bytes(),
            })
            .flat_map(|v| v.into_iter())
            .collect()
    }
}
