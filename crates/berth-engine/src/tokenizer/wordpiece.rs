//! BERT's WordPiece tokenizer as Hugging Face's `tokenizer.json` describes it: the BertNormalizer
//! (clean text, spaces around CJK characters, lowercase, accents stripped), the BertPreTokenizer
//! (split on whitespace and punctuation), greedy longest-match WordPiece with `##` continuations,
//! then `[CLS] … [SEP]`.

use std::collections::HashMap;

use serde_json::Value;
use unicode_normalization::UnicodeNormalization;

use crate::error::EngineError;

pub struct WordPiece {
    vocab: HashMap<String, u32>,
    unk: u32,
    cls: u32,
    sep: u32,
    prefix: String,
    max_chars_per_word: usize,
    lowercase: bool,
    strip_accents: bool,
}

impl WordPiece {
    /// Build from the JSON of a `tokenizer.json` whose model is WordPiece.
    pub fn from_tokenizer_json(bytes: &[u8]) -> Result<Self, EngineError> {
        let err = |m: &str| EngineError::Tokenizer(format!("tokenizer.json: {m}"));
        let v: Value = serde_json::from_slice(bytes).map_err(|e| err(&e.to_string()))?;
        let model = &v["model"];
        if model["type"] != "WordPiece" {
            return Err(err("only WordPiece models are supported"));
        }
        let vocab: HashMap<String, u32> = model["vocab"]
            .as_object()
            .ok_or_else(|| err("no vocabulary"))?
            .iter()
            .filter_map(|(k, id)| id.as_u64().and_then(|i| u32::try_from(i).ok()).map(|i| (k.clone(), i)))
            .collect();
        let id = |t: &str| vocab.get(t).copied().ok_or_else(|| err(&format!("the vocabulary lacks {t}")));
        let norm = &v["normalizer"];
        let lowercase = norm["lowercase"].as_bool().unwrap_or(true);
        Ok(Self {
            unk: id(model["unk_token"].as_str().unwrap_or("[UNK]"))?,
            cls: id("[CLS]")?,
            sep: id("[SEP]")?,
            prefix: model["continuing_subword_prefix"].as_str().unwrap_or("##").to_string(),
            max_chars_per_word: model["max_input_chars_per_word"].as_u64().unwrap_or(100) as usize,
            lowercase,
            strip_accents: norm["strip_accents"].as_bool().unwrap_or(lowercase),
            vocab,
        })
    }

    fn normalize(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        for c in text.chars() {
            if c == '\0' || c == '\u{fffd}' || (c.is_control() && !matches!(c, '\t' | '\n' | '\r')) {
                continue;
            }
            if c.is_whitespace() {
                out.push(' ');
            } else if is_cjk(c) {
                out.push(' ');
                out.push(c);
                out.push(' ');
            } else {
                out.push(c);
            }
        }
        if self.lowercase {
            out = out.to_lowercase();
        }
        if self.strip_accents {
            out = out.nfd().filter(|&c| !unicode_normalization::char::is_combining_mark(c)).collect();
        }
        out
    }

    /// Token ids with `[CLS]` and `[SEP]`, truncated to `max_len` in all.
    pub fn encode(&self, text: &str, max_len: usize) -> Vec<u32> {
        let mut ids = vec![self.cls];
        let normalized = self.normalize(text);
        'words: for word in split_words(&normalized) {
            let chars: Vec<char> = word.chars().collect();
            if chars.len() > self.max_chars_per_word {
                ids.push(self.unk);
                continue;
            }
            let mut pieces = Vec::new();
            let mut start = 0;
            while start < chars.len() {
                let mut end = chars.len();
                let mut found = None;
                while start < end {
                    let mut piece: String = chars[start..end].iter().collect();
                    if start > 0 {
                        piece.insert_str(0, &self.prefix);
                    }
                    if let Some(&id) = self.vocab.get(&piece) {
                        found = Some(id);
                        break;
                    }
                    end -= 1;
                }
                match found {
                    Some(id) => {
                        pieces.push(id);
                        start = end;
                    }
                    None => {
                        ids.push(self.unk);
                        continue 'words;
                    }
                }
            }
            ids.extend(pieces);
            if ids.len() >= max_len.saturating_sub(1) {
                break;
            }
        }
        ids.truncate(max_len.saturating_sub(1).max(1));
        ids.push(self.sep);
        ids
    }
}

fn is_cjk(c: char) -> bool {
    matches!(c as u32, 0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F | 0x2B820..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F)
}

/// BERT treats ASCII symbols and Unicode punctuation as words of their own.
fn is_punctuation(c: char) -> bool {
    c.is_ascii_punctuation()
        || matches!(c as u32, 0x00A1..=0x00BF | 0x2010..=0x2027 | 0x2030..=0x205E | 0x3001..=0x3003 | 0x3008..=0x3011
            | 0xFF01..=0xFF0F | 0xFF1A..=0xFF20 | 0xFF3B..=0xFF40 | 0xFF5B..=0xFF65)
}

fn split_words(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        if c.is_whitespace() || is_punctuation(c) {
            if let Some(s) = start.take() {
                out.push(&text[s..i]);
            }
            if is_punctuation(c) {
                out.push(&text[i..i + c.len_utf8()]);
            }
        } else if start.is_none() {
            start = Some(i);
        }
    }
    if let Some(s) = start {
        out.push(&text[s..]);
    }
    out
}
