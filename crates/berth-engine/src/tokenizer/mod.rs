//! Tokenizers built from a GGUF file's own metadata: GPT-2 style byte-level BPE (`gpt2`, with the
//! pre-tokenizer named by `tokenizer.ggml.pre`) and SentencePiece-style vocabularies (`llama`).
//!
//! Special and control tokens are recognised only where the caller says so: text from users is
//! encoded with [`Tokenizer::encode`]`(text, false)`, so a user writing `<|im_start|>` gets the
//! characters, not the control token; only the chat template's own markers become special tokens.

mod bpe;
mod pretokenize;
mod spm;
mod stream;
mod symbols;
pub mod wordpiece;

pub use stream::StreamDecoder;

use std::collections::HashMap;

use berth_formats::gguf::{Array, GgufFile};

use crate::error::EngineError;

/// GGUF token types (llama.cpp's `llama_token_type`).
pub mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

enum Model {
    Bpe(Box<bpe::Bpe>),
    Spm(Box<spm::Spm>),
}

pub struct Tokenizer {
    model: Model,
    tokens: Vec<String>,
    types: Vec<i32>,
    /// Special and control token strings, longest first, for splitting template text.
    specials: Vec<(String, u32)>,
    /// Which bytes start some special token, so plain text is scanned quickly.
    special_first_bytes: [bool; 256],
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    /// Tokens that end generation (EOS, EOT and the like).
    end_of_generation: Vec<u32>,
}

/// The longest text berth tokenizes in one call (bytes); longer input is refused, not truncated.
pub const MAX_TEXT_BYTES: usize = 16 << 20;

/// The mark [`Tokenizer::defuse_specials`] puts into special tokens' text from users: a Unicode
/// noncharacter, which no vocabulary's special token contains and no text means to hold.
pub const DEFUSED: char = '\u{FDD0}';

enum Piece<'t> {
    Text(&'t str),
    Special(u32),
}

fn check_length(text: &str) -> Result<(), EngineError> {
    if text.len() > MAX_TEXT_BYTES {
        return Err(EngineError::Tokenizer(format!(
            "the text is {} bytes; berth tokenizes at most {MAX_TEXT_BYTES} at once",
            text.len()
        )));
    }
    Ok(())
}

impl Tokenizer {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, EngineError> {
        let err = |m: String| EngineError::Tokenizer(m);
        let model_name = gguf.get_str("tokenizer.ggml.model").ok_or_else(|| err("no tokenizer.ggml.model".into()))?;
        let tokens = match gguf.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
            Some(Array::String(t)) if !t.is_empty() => t.clone(),
            _ => return Err(err("no tokenizer.ggml.tokens".into())),
        };
        let n = tokens.len();
        let types: Vec<i32> = match gguf.get("tokenizer.ggml.token_type").and_then(|v| v.as_array()) {
            Some(Array::I32(t)) if t.len() == n => t.clone(),
            Some(Array::U32(t)) if t.len() == n => t.iter().map(|&x| x as i32).collect(),
            None => vec![token_type::NORMAL; n],
            Some(_) => return Err(err("tokenizer.ggml.token_type does not match the token list".into())),
        };
        let id = |key: &str| -> Result<Option<u32>, EngineError> {
            match gguf.get_u64(key) {
                None => Ok(None),
                Some(v) if (v as usize) < n => Ok(Some(v as u32)),
                Some(v) => Err(err(format!("{key} = {v} is outside the vocabulary of {n}"))),
            }
        };
        let flag = |key: &str, default: bool| gguf.get(key).and_then(|v| v.as_bool()).unwrap_or(default);
        let (model, add_bos_default) = match model_name {
            "gpt2" => {
                let merges = match gguf.get("tokenizer.ggml.merges").and_then(|v| v.as_array()) {
                    Some(Array::String(m)) => m.clone(),
                    _ => return Err(err("a gpt2 tokenizer needs tokenizer.ggml.merges".into())),
                };
                let pre = gguf.get_str("tokenizer.ggml.pre").unwrap_or("default");
                let pretokenizer = pretokenize::PreTokenizer::named(pre)?;
                (Model::Bpe(Box::new(bpe::Bpe::new(&tokens, &merges, pretokenizer)?)), false)
            }
            "gemma4" => {
                let merges = match gguf.get("tokenizer.ggml.merges").and_then(|v| v.as_array()) {
                    Some(Array::String(m)) => m.clone(),
                    _ => return Err(err("a gemma4 tokenizer needs tokenizer.ggml.merges".into())),
                };
                (Model::Bpe(Box::new(bpe::Bpe::sentencepiece_style(&tokens, &merges)?)), true)
            }
            "llama" => {
                let scores = match gguf.get("tokenizer.ggml.scores").and_then(|v| v.as_array()) {
                    Some(Array::F32(s)) if s.len() == n => s.clone(),
                    None => vec![0.0; n],
                    Some(_) => return Err(err("tokenizer.ggml.scores does not match the token list".into())),
                };
                let unk = id("tokenizer.ggml.unknown_token_id")?;
                let add_space = flag("tokenizer.ggml.add_space_prefix", true);
                (Model::Spm(Box::new(spm::Spm::new(&tokens, &scores, &types, unk, add_space))), true)
            }
            other => {
                return Err(err(format!(
                    "tokenizer model {other:?} is not supported (berth reads \"gpt2\", \"gemma4\" and \"llama\" vocabularies)"
                )));
            }
        };
        let bos = id("tokenizer.ggml.bos_token_id")?;
        let eos = id("tokenizer.ggml.eos_token_id")?;
        let mut end_of_generation: Vec<u32> =
            [eos, id("tokenizer.ggml.eot_token_id")?, id("tokenizer.ggml.eom_token_id")?]
                .into_iter()
                .flatten()
                .collect();
        // Like llama.cpp, also stop at the control tokens that close a turn in common templates.
        for (i, t) in tokens.iter().enumerate() {
            let closes_turn = ["<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>"]
                .contains(&t.as_str());
            if closes_turn && types[i] == token_type::CONTROL && !end_of_generation.contains(&(i as u32)) {
                end_of_generation.push(i as u32);
            }
        }
        let mut specials: Vec<(String, u32)> = tokens
            .iter()
            .enumerate()
            .filter(|(i, t)| {
                (types[*i] == token_type::CONTROL || types[*i] == token_type::USER_DEFINED) && !t.is_empty()
            })
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        let mut special_first_bytes = [false; 256];
        for (s, _) in &specials {
            special_first_bytes[s.as_bytes()[0] as usize] = true;
        }
        Ok(Self {
            special_first_bytes,
            model,
            // llama.cpp adds BOS for Gemma 4 whatever its file says.
            add_bos: model_name == "gemma4" || flag("tokenizer.ggml.add_bos_token", add_bos_default),
            add_eos: flag("tokenizer.ggml.add_eos_token", false),
            tokens,
            types,
            specials,
            bos,
            eos,
            end_of_generation,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The token's text as stored in the vocabulary.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The token's GGUF type ([`token_type`]); unknown ids read as UNUSED.
    pub fn token_type(&self, id: u32) -> i32 {
        self.types.get(id as usize).copied().unwrap_or(token_type::UNUSED)
    }

    /// Whether a token ends generation.
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.contains(&id)
    }

    pub fn end_of_generation_ids(&self) -> &[u32] {
        &self.end_of_generation
    }

    /// Encode text without BOS/EOS. With `parse_special`, control and user-defined token strings in
    /// the text become those tokens; without, they are ordinary characters.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, EngineError> {
        check_length(text)?;
        let mut out = Vec::new();
        self.encode_into(text, parse_special, &mut out);
        Ok(out)
    }

    /// User-defined tokens (MPT's runs of spaces, added words) are always read out of text, as
    /// llama.cpp and Hugging Face do; control tokens only with `control`.
    fn encode_into(&self, text: &str, control: bool, out: &mut Vec<u32>) {
        self.split_specials(text, control, |piece| match piece {
            Piece::Text(t) => self.encode_plain(t, out),
            Piece::Special(id) => out.push(id),
        });
    }

    /// Make text from a user safe to put into a chat template: every control token's text in it
    /// gets an invisible mark ([`DEFUSED`]) after its first character, so that no control token
    /// can be read out of it once it is rendered. Templates see the text as it was everywhere else.
    pub fn defuse_specials<'a>(&self, text: &'a str) -> std::borrow::Cow<'a, str> {
        let mut out: Option<String> = None;
        let mut copied = 0;
        for (i, c) in text.char_indices() {
            if !self.special_first_bytes[text.as_bytes()[i] as usize] {
                continue;
            }
            let defusable = |s: &str| s.len() > c.len_utf8() && text[i..].starts_with(s);
            if self.specials.iter().any(|(s, id)| self.types[*id as usize] == token_type::CONTROL && defusable(s)) {
                let buf = out.get_or_insert_with(|| String::with_capacity(text.len() + 16));
                let after = i + c.len_utf8();
                buf.push_str(&text[copied..after]);
                buf.push(DEFUSED);
                copied = after;
            }
        }
        match out {
            None => std::borrow::Cow::Borrowed(text),
            Some(mut buf) => {
                buf.push_str(&text[copied..]);
                std::borrow::Cow::Owned(buf)
            }
        }
    }

    /// Encode a rendered chat template: the special tokens the template wrote become tokens; text
    /// that came from users (defused with [`Self::defuse_specials`]) stays text, its marks removed.
    pub fn encode_rendered(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        check_length(text)?;
        let mut out = Vec::new();
        self.split_specials(text, true, |piece| match piece {
            Piece::Text(t) if t.contains(DEFUSED) => self.encode_into(&t.replace(DEFUSED, ""), false, &mut out),
            Piece::Text(t) => self.encode_plain(t, &mut out),
            Piece::Special(id) => out.push(id),
        });
        Ok(out)
    }

    /// Walk text as runs of plain text and special tokens (longest match first): user-defined
    /// tokens always, control tokens with `control`.
    fn split_specials<'t>(&self, text: &'t str, control: bool, mut each: impl FnMut(Piece<'t>)) {
        let mut rest = text;
        let mut i = 0;
        while i < rest.len() {
            let hit = if self.special_first_bytes[rest.as_bytes()[i] as usize] {
                self.specials.iter().find(|(s, id)| {
                    (control || self.types[*id as usize] != token_type::CONTROL) && rest[i..].starts_with(s.as_str())
                })
            } else {
                None
            };
            match hit {
                Some((s, id)) => {
                    if i > 0 {
                        each(Piece::Text(&rest[..i]));
                    }
                    each(Piece::Special(*id));
                    rest = &rest[i + s.len()..];
                    i = 0;
                }
                None => i += rest[i..].chars().next().map_or(1, char::len_utf8),
            }
        }
        if !rest.is_empty() {
            each(Piece::Text(rest));
        }
    }

    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        match &self.model {
            Model::Bpe(b) => b.encode(text, out),
            Model::Spm(s) => s.encode(text, out),
        }
    }

    /// The bytes a token stands for in output text (control tokens stand for nothing).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(text) = self.tokens.get(id as usize) else { return Vec::new() };
        match self.types[id as usize] {
            token_type::CONTROL | token_type::UNKNOWN | token_type::UNUSED => Vec::new(),
            token_type::USER_DEFINED => text.as_bytes().to_vec(),
            _ => match &self.model {
                Model::Bpe(b) => b.token_bytes(text),
                Model::Spm(s) => s.token_bytes(text, self.types[id as usize]),
            },
        }
    }

    /// Decode tokens to text (invalid UTF-8 becomes U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            bytes.extend(self.token_bytes(id));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// Build a token → id map (first occurrence wins, as llama.cpp does).
fn index(tokens: &[String]) -> HashMap<String, u32> {
    let mut m = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        m.entry(t.clone()).or_insert(i as u32);
    }
    m
}
