//! Pre-tokenizers: the regular expressions that cut text into pieces before BPE, by the name
//! `tokenizer.ggml.pre` gives them (the same expressions llama.cpp uses).

use fancy_regex::Regex;

use crate::error::EngineError;

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const EACH_DIGIT: &str = r"\p{N}";

/// The names berth knows, for the error message.
const KNOWN: &str = "gpt2/default, smollm, starcoder, refact, llama3/llama-bpe, qwen2, tekken";

pub struct PreTokenizer {
    /// Applied in turn: each cuts every piece the previous ones left.
    steps: Vec<Regex>,
}

impl PreTokenizer {
    pub fn named(name: &str) -> Result<Self, EngineError> {
        let patterns: &[&str] = match name {
            "default" | "gpt2" | "gpt-2" | "olmo" | "jais" | "phi-2" | "poro-chat" => &[GPT2],
            "smollm" | "starcoder" | "refact" | "codeshell" => &[EACH_DIGIT, GPT2],
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" | "smaug-bpe" => &[LLAMA3],
            "qwen2" | "stablelm2" | "deepseek-r1-qwen" | "hunyuan" => &[QWEN2],
            "tekken" => &[TEKKEN],
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
    fn unknown_names_are_refused() {
        assert!(PreTokenizer::named("no-such-pre").is_err());
    }
}
