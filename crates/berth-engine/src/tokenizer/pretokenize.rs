//! Pre-tokenizers: the regular expressions that cut text into pieces before BPE, by the name
//! `tokenizer.ggml.pre` gives them (the same expressions llama.cpp uses).

use fancy_regex::Regex;

use crate::error::EngineError;

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const EACH_DIGIT: &str = r"\p{N}";
const QWEN35: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const NEWLINE: &str = "[\r\n]";
const CJK: &str = "[\u{4e00}-\u{9fa5}\u{800}-\u{4e00}\u{ac00}-\u{d7ff}]+";
const DEEPSEEK_LLM_LETTERS: &str = "\\s?[A-Za-z\u{b5}\u{c0}-\u{d6}\u{d8}-\u{f6}\u{f8}-\u{1ba}\u{1bc}-\u{1bf}\u{1c4}-\u{293}\u{295}-\u{2af}\u{370}-\u{373}\u{376}\u{377}\u{37b}-\u{37d}\u{37f}\u{386}\u{388}-\u{38a}\u{38c}\u{38e}-\u{3a1}\u{3a3}-\u{3f5}\u{3f7}-\u{481}\u{48a}-\u{52f}\u{531}-\u{556}\u{10a0}-\u{10c5}\u{13a0}-\u{13f5}\u{13f8}-\u{13fd}\u{1c90}-\u{1cba}\u{1cbd}-\u{1cbf}\u{1d00}-\u{1d2b}\u{1d6b}-\u{1d77}\u{1d79}-\u{1d9a}\u{1e00}-\u{1f15}\u{1f18}-\u{1f1d}\u{1f20}-\u{1f45}\u{1f48}-\u{1f4d}\u{1f50}-\u{1f57}\u{1f59}\u{1f5b}\u{1f5d}\u{1f5f}-\u{1f7d}\u{1f80}-\u{1fb4}\u{1fb6}-\u{1fbc}\u{1fbe}\u{1fc2}-\u{1fc4}\u{1fc6}-\u{1fcc}\u{1fd0}-\u{1fd3}\u{1fd6}-\u{1fdb}\u{1fe0}-\u{1fec}\u{1ff2}-\u{1ff4}\u{1ff6}-\u{1ffc}\u{2102}\u{2107}\u{210a}-\u{2113}\u{2115}\u{2119}-\u{211d}\u{2124}\u{2126}\u{2128}\u{212a}-\u{212d}\u{212f}-\u{2134}\u{2139}\u{213c}-\u{213f}\u{2145}-\u{2149}\u{214e}\u{2183}\u{2184}\u{2c00}-\u{2c7b}\u{2c7e}-\u{2ce4}\u{2ceb}-\u{2cee}\u{2cf2}\u{2cf3}\u{a640}-\u{a66d}\u{a680}-\u{a69b}\u{a722}-\u{a76f}\u{a771}-\u{a787}\u{a78b}-\u{a78e}\u{ab70}-\u{abbf}\u{fb00}-\u{fb06}\u{fb13}-\u{fb17}\u{ff21}-\u{ff3a}\u{ff41}-\u{ff5a}\u{10400}-\u{1044f}\u{104b0}-\u{104d3}\u{104d8}-\u{104fb}\u{10c80}-\u{10cb2}\u{10cc0}-\u{10cf2}\u{118a0}-\u{118df}\u{1e900}-\u{1e943}]+";
const DEEPSEEK_LLM_PUNCT: &str = "\\s?[!-/:-~\u{ff01}-\u{ff0f}\u{ff1a}-\u{ff5e}\u{2018}-\u{201f}\u{3000}-\u{3002}]+";
const TRAILING_SPACE: &str = r"\s+$";
const DIGITS: &str = r"\p{N}+";
const DEEPSEEK_CODER_LETTERS: &str = r"\s?\p{L}+";
const DEEPSEEK_CODER_PUNCT: &str = r"\s?\p{P}+";
const DEEPSEEK3_CJK: &str = "[\u{4e00}-\u{9fa5}\u{3040}-\u{309f}\u{30a0}-\u{30ff}]+";
const DEEPSEEK3: &str = r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##;
const UP_TO_3_DIGITS: &str = r"\p{N}{1,3}";
const FALCON_PUNCT: &str = r"[\p{P}\$\+<=>\^~\|`]+";
const FALCON: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const THREE_DIGITS: &str = "[0-9][0-9][0-9]";
const LINES: &str = "[^\n]+|[\n]+";

/// The names berth knows, for the error message.
const KNOWN: &str = "gpt2/default, mpt, smollm, starcoder, refact, command-r, llama3/llama-bpe, qwen2, qwen35, tekken, deepseek-llm, deepseek-coder, deepseek-v3, falcon, gemma4";

pub struct PreTokenizer {
    /// Applied in turn: each cuts every piece the previous ones left.
    steps: Vec<Regex>,
}

impl PreTokenizer {
    pub fn named(name: &str) -> Result<Self, EngineError> {
        let patterns: &[&str] = match name {
            "default" | "gpt2" | "gpt-2" | "olmo" | "jais" | "phi-2" | "roberta-bpe" => &[GPT2],
            "mpt" => &[FALCON],
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => &[EACH_DIGIT, GPT2],
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "smaug-bpe" | "dbrx" => {
                &[LLAMA3]
            }
            "qwen2" | "stablelm2" | "deepseek-r1-qwen" | "hunyuan" => &[QWEN2],
            "qwen35" => &[QWEN35],
            "tekken" => &[TEKKEN],
            "deepseek-llm" => &[NEWLINE, DEEPSEEK_LLM_LETTERS, DEEPSEEK_LLM_PUNCT, TRAILING_SPACE, CJK, DIGITS],
            "deepseek-coder" => &[NEWLINE, DEEPSEEK_CODER_LETTERS, DEEPSEEK_CODER_PUNCT, CJK, EACH_DIGIT],
            "deepseek-v3" => &[UP_TO_3_DIGITS, DEEPSEEK3_CJK, DEEPSEEK3],
            "falcon" => &[FALCON_PUNCT, FALCON, THREE_DIGITS],
            // SentencePiece-style BPE merges whole lines (spaces are already `▁`).
            "gemma4" => &[LINES],
            other => {
                return Err(EngineError::Tokenizer(format!(
                    "pre-tokenizer {other:?} is not supported (berth knows {KNOWN})"
                )));
            }
        };
        let steps = patterns
            .iter()
            .map(|p| Regex::new(p).map_err(|e| EngineError::Tokenizer(format!("pre-tokenizer pattern: {e}"))))
            .collect::<Result<_, _>>()?;
        Ok(Self { steps })
    }

    /// Cut text into pieces: the matches of each expression, and the text between them.
    pub fn split<'t>(&self, text: &'t str) -> Vec<&'t str> {
        let mut pieces = vec![text];
        for re in &self.steps {
            let mut next = Vec::with_capacity(pieces.len() * 2);
            for piece in pieces {
                let mut last = 0;
                for m in re.find_iter(piece) {
                    // A pattern that gives up (backtracking limit) leaves the rest as one piece.
                    let Ok(m) = m else { break };
                    if m.start() > last {
                        next.push(&piece[last..m.start()]);
                    }
                    if m.end() > m.start() {
                        next.push(m.as_str());
                    }
                    last = m.end();
                }
                if last < piece.len() {
                    next.push(&piece[last..]);
                }
            }
            pieces = next;
        }
        pieces
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smollm_splits_each_digit_then_like_gpt2() {
        let p = PreTokenizer::named("smollm").unwrap();
        assert_eq!(p.split("Hello world 123 it's"), ["Hello", " world", " ", "1", "2", "3", " it", "'s"]);
        assert_eq!(p.split("a  \n b"), ["a", "  \n", " b"]);
    }

    #[test]
    fn every_known_pre_tokenizer_compiles() {
        for name in KNOWN.split(", ").flat_map(|n| n.split('/')) {
            if let Err(e) = PreTokenizer::named(name) {
                panic!("{name}: {e:?}");
            }
        }
    }

    #[test]
    fn unknown_names_are_refused() {
        assert!(PreTokenizer::named("no-such-pre").is_err());
    }
}
