//! The doubly linked list of symbols both merge-based tokenizers (BPE by rank, SentencePiece by
//! score) rewrite as they merge adjacent pieces; queued merges are checked against it for staleness.

#[derive(Clone, Copy)]
pub struct Symbol {
    /// Byte offset of the piece in the word.
    pub start: usize,
    /// Byte length; 0 once merged into its left neighbour.
    pub len: usize,
    pub prev: Option<usize>,
    pub next: Option<usize>,
}

/// One symbol per character of `text`.
pub fn from_chars(text: &str) -> Vec<Symbol> {
    let mut symbols: Vec<Symbol> = text
        .char_indices()
        .enumerate()
        .map(|(i, (start, c))| Symbol { start, len: c.len_utf8(), prev: i.checked_sub(1), next: Some(i + 1) })
        .collect();
    if let Some(last) = symbols.last_mut() {
        last.next = None;
    }
    symbols
}

/// Whether a merge of `left` and `right` queued when together they were `size` bytes still applies.
pub fn still_valid(symbols: &[Symbol], left: usize, right: usize, size: usize) -> bool {
    symbols[left].len != 0 && symbols[right].len != 0 && symbols[left].len + symbols[right].len == size
}

/// Merge `right` into its left neighbour `left` and relink the list.
pub fn merge(symbols: &mut [Symbol], left: usize, right: usize) {
    symbols[left].len += symbols[right].len;
    symbols[right].len = 0;
    symbols[left].next = symbols[right].next;
    if let Some(n) = symbols[right].next {
        symbols[n].prev = Some(left);
    }
}
