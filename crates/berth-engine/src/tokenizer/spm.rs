//! SentencePiece-style ("llama") vocabularies as llama.cpp encodes them: spaces become '▁', adjacent
//! symbols merge greedily by the score of the merged piece, and what the vocabulary lacks falls back
//! to byte tokens `<0xXX>`.

use std::collections::{BinaryHeap, HashMap};

use super::symbols::{self, Symbol};
use super::token_type;

pub struct Spm {
    vocab: HashMap<String, u32>,
    scores: Vec<f32>,
    byte_tokens: [Option<u32>; 256],
    unk: Option<u32>,
    add_space_prefix: bool,
}

/// A candidate merge: highest score first, then leftmost.
#[derive(PartialEq)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.score.total_cmp(&other.score).then(other.left.cmp(&self.left))
    }
}

impl Spm {
    pub fn new(tokens: &[String], scores: &[f32], types: &[i32], unk: Option<u32>, add_space_prefix: bool) -> Self {
        let mut byte_tokens = [None; 256];
        for (i, t) in tokens.iter().enumerate() {
            if types[i] == token_type::BYTE
                && let Some(b) = parse_byte_token(t)
            {
                byte_tokens[b as usize] = Some(i as u32);
            }
        }
        Self { vocab: super::index(tokens), scores: scores.to_vec(), byte_tokens, unk, add_space_prefix }
    }

    pub fn encode(&self, text: &str, out: &mut Vec<u32>) {
        let mut s = String::with_capacity(text.len() + 3);
        if self.add_space_prefix {
            s.push('▁');
        }
        s.push_str(&text.replace(' ', "▁"));
        let mut symbols = symbols::from_chars(&s);
        let mut queue = BinaryHeap::new();
        let mut merged_from: HashMap<(usize, usize), (usize, usize)> = HashMap::new();
        let try_add = |queue: &mut BinaryHeap<Bigram>, symbols: &[Symbol], l: usize, r: usize| {
            let text = &s[symbols[l].start..symbols[r].start + symbols[r].len];
            if let Some(&id) = self.vocab.get(text) {
                queue.push(Bigram { score: self.scores[id as usize], left: l, right: r, size: text.len() });
            }
        };
        for i in 1..symbols.len() {
            try_add(&mut queue, &symbols, i - 1, i);
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (b.left, b.right);
            if !symbols::still_valid(&symbols, l, r, b.size) {
                continue;
            }
            merged_from.insert((symbols[l].start, b.size), (symbols[l].len, symbols[r].len));
            symbols::merge(&mut symbols, l, r);
            if let Some(p) = symbols[l].prev {
                try_add(&mut queue, &symbols, p, l);
            }
            if let Some(n) = symbols[l].next {
                try_add(&mut queue, &symbols, l, n);
            }
        }
        let mut at = if symbols.is_empty() { None } else { Some(0) };
        while let Some(i) = at {
            self.resegment(&s, symbols[i].start, symbols[i].len, &merged_from, out);
            at = symbols[i].next;
        }
    }

    fn resegment(
        &self,
        s: &str,
        start: usize,
        len: usize,
        merged_from: &HashMap<(usize, usize), (usize, usize)>,
        out: &mut Vec<u32>,
    ) {
        let text = &s[start..start + len];
        if let Some(&id) = self.vocab.get(text) {
            out.push(id);
            return;
        }
        if let Some(&(left, right)) = merged_from.get(&(start, len)) {
            self.resegment(s, start, left, merged_from, out);
            self.resegment(s, start + left, right, merged_from, out);
            return;
        }
        for b in text.bytes() {
            if let Some(id) = self.byte_tokens[b as usize].or(self.unk) {
                out.push(id)
            }
        }
    }

    pub fn token_bytes(&self, text: &str, ty: i32) -> Vec<u8> {
        if ty == token_type::BYTE
            && let Some(b) = parse_byte_token(text)
        {
            return vec![b];
        }
        text.replace('▁', " ").into_bytes()
    }
}

fn parse_byte_token(t: &str) -> Option<u8> {
    let hex = t.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab() -> Spm {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![2, 3, 3];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(token_type::BYTE);
        }
        for t in [
            "▁", "h", "e", "l", "o", "▁h", "he", "ll", "llo", "▁he", "▁hello", "w", "r", "d", "▁w", "or", "▁wor", "ld",
            "▁world",
        ] {
            tokens.push(t.into());
            types.push(1);
        }
        let scores: Vec<f32> = (0..tokens.len()).map(|i| i as f32 / 100.0).collect();
        Spm::new(&tokens, &scores, &types, Some(0), true)
    }

    #[test]
    fn merges_by_score_and_falls_back_to_bytes() {
        let spm = vocab();
        let mut out = Vec::new();
        spm.encode("hello world", &mut out);
        let text: Vec<String> = out.iter().map(|&i| spm.vocab.iter().find(|e| *e.1 == i).unwrap().0.clone()).collect();
        assert_eq!(text, ["▁hello", "▁world"]);
        let mut out = Vec::new();
        spm.encode("é", &mut out);
        // '▁' then the two bytes of 'é' as byte tokens.
        assert_eq!(out.len(), 3);
        let bytes: Vec<u8> = out[1..].iter().map(|&i| (i - 3) as u8).collect();
        assert_eq!(bytes, "é".as_bytes());
    }
}
