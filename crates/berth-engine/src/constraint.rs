//! Constrained decoding: a JSON schema, a Lark grammar or a regular expression, compiled by
//! llguidance (the grammar engine llama.cpp, vLLM and SGLang use) against the model's vocabulary.
//! Each constrained sequence holds its own [`Constraint`]; before a token is picked, every token
//! the grammar cannot take is masked out, end-of-generation is allowed only where the grammar may
//! end, and the tokens the grammar forces are appended without sampling.
//!
//! A grammar is code from a client: llguidance bounds its size, the lexer's states and the work
//! of each mask (its `ParserLimits`), and berth bounds the text it accepts, so a hostile schema is
//! a 400 or a stopped sequence, never a hang.

use std::sync::Arc;

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{self, SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{JsonCompileOptions, Matcher, ParserFactory};
use serde_json::Value;

use crate::error::EngineError;
use crate::tokenizer::{Tokenizer, token_type};

/// The longest grammar, regex or schema text berth compiles (bytes).
pub const MAX_GRAMMAR_BYTES: usize = 256 << 10;

/// Most tokens a grammar may force in one step (a long constant string is forced in pieces).
pub const MAX_FORCED_TOKENS: usize = 64;

/// What a request asks its answer to follow, as the client sent it.
#[derive(Debug, Clone, PartialEq)]
pub enum ConstraintSpec {
    /// Any JSON object (OpenAI's `json_object`, Ollama's `format: "json"`).
    JsonObject,
    /// A JSON schema (OpenAI's `json_schema`, Ollama's `format: {…}`).
    JsonSchema(Value),
    /// A Lark grammar in llguidance's dialect (a berth extension).
    Lark(String),
    /// A regular expression the whole answer matches (a berth extension).
    Regex(String),
}

/// The grammar compiler of one model: its vocabulary as a token trie, built once.
pub struct Grammars {
    factory: ParserFactory,
}

/// The model's tokenizer as llguidance sees it: the trie of every token's bytes (control tokens
/// marked as special, so no text can spell them) and berth's own tokenizer for forced text.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        // berth's tokenizer is the model's (it matches llama.cpp token for token), where its
        // tokens spell exactly these bytes; a SentencePiece vocabulary's added leading space, or
        // bytes that are not UTF-8, fall back to the longest-match split.
        let ids = std::str::from_utf8(s).ok().and_then(|text| self.tokenizer.encode(text, false).ok());
        match ids {
            Some(ids) if ids.iter().flat_map(|&t| self.trie.token(t)).copied().eq(s.iter().copied()) => ids,
            _ => self.trie.greedy_tokenize(s),
        }
    }
}

impl Grammars {
    pub fn new(tokenizer: Arc<Tokenizer>) -> Result<Grammars, EngineError> {
        let n = tokenizer.vocab_size();
        let words: Vec<Vec<u8>> = (0..n as u32)
            .map(|id| match tokenizer.token_type(id) {
                // Special tokens are spelled 0xFF + their text: grammar text never matches them,
                // and a grammar may name them (`<|im_end|>` in Lark) on purpose.
                token_type::CONTROL => {
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend_from_slice(tokenizer.token_text(id).unwrap_or("").as_bytes());
                    w
                }
                _ => tokenizer.token_bytes(id),
            })
            .collect();
        let mut ends = tokenizer.end_of_generation_ids().to_vec();
        let eos = ends.first().copied().or(tokenizer.eos).unwrap_or(0);
        if ends.is_empty() {
            ends.push(eos);
        }
        let trie = TokTrie::from(&TokRxInfo::new(n as u32, eos), &words).with_eos_tokens(&ends);
        let env: TokEnv = Arc::new(Vocabulary { trie, tokenizer });
        let mut factory = ParserFactory::new(
            &env,
            toktrie::InferenceCapabilities::default(),
            &llguidance::earley::SlicedBiasComputer::general_slices(),
        )
        .map_err(|e| EngineError::Tokenizer(format!("cannot build the grammar vocabulary: {e}")))?;
        factory.quiet();
        *factory.limits_mut() = ParserLimits { verbose_errors: false, ..ParserLimits::default() };
        Ok(Grammars { factory })
    }

    /// Compile a request's constraint; an error names `param` (the field as the client spelled
    /// it) and says what in the grammar berth cannot follow.
    pub fn compile(&self, spec: &ConstraintSpec, param: &str) -> Result<Constraint, EngineError> {
        let invalid = |message: String| EngineError::InvalidParameter { param: param.to_string(), message };
        let grammar = match spec {
            ConstraintSpec::JsonObject => {
                TopLevelGrammar::from_json_schema(json_options(serde_json::json!({"type": "object"})))
            }
            ConstraintSpec::JsonSchema(schema) => {
                let size = serde_json::to_vec(schema).map(|v| v.len()).unwrap_or(usize::MAX);
                if size > MAX_GRAMMAR_BYTES {
                    return Err(invalid(format!(
                        "{param}: the schema is {size} bytes; berth compiles schemas of at most {MAX_GRAMMAR_BYTES}"
                    )));
                }
                if !schema.is_object() {
                    return Err(invalid(format!("{param}: a JSON schema must be an object")));
                }
                let mut schema = schema.clone();
                bound_numbers(&mut schema).map_err(|m| invalid(format!("{param}: {m}")))?;
                TopLevelGrammar::from_json_schema(json_options(schema))
            }
            ConstraintSpec::Lark(text) | ConstraintSpec::Regex(text) => {
                if text.len() > MAX_GRAMMAR_BYTES {
                    return Err(invalid(format!(
                        "{param}: the grammar is {} bytes; berth compiles grammars of at most {MAX_GRAMMAR_BYTES}",
                        text.len()
                    )));
                }
                if matches!(spec, ConstraintSpec::Lark(_)) {
                    TopLevelGrammar::from_lark(text.clone())
                } else {
                    TopLevelGrammar::from_regex(text)
                }
            }
        };
        let parser = self.factory.create_parser(grammar).map_err(|e| invalid(format!("{param}: {}", plain(&e))))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(invalid(format!("{param}: {e}")));
        }
        Ok(Constraint { matcher, trigger: None })
    }
}

/// A JSON schema inside a Lark grammar (`%json {…}`), with the same options and number bounds as
/// a schema on its own.
pub fn lark_json(schema: &Value) -> String {
    let mut schema = schema.clone();
    // A multipleOf too fine is refused when the grammar compiles (llguidance reports it).
    let _ = bound_numbers(&mut schema);
    format!("%json {}", json_options(schema))
}

/// JSON as clients want it back: compact separators with a space (`{"a": 1, "b": 2}`), no
/// free whitespace (a small model given free whitespace can emit newlines until it runs out of
/// tokens), and a schema keyword llguidance does not implement is an error, never ignored.
fn json_options(mut schema: Value) -> Value {
    let options = JsonCompileOptions {
        item_separator: ", ".into(),
        key_separator: ": ".into(),
        whitespace_flexible: false,
        lenient: false,
        ..JsonCompileOptions::default()
    };
    if let Some(map) = schema.as_object_mut() {
        map.remove("x-guidance");
    }
    options.apply_to(&mut schema);
    schema
}

/// The most digits a number may have: llama.cpp's JSON-schema grammars allow 16 before the point
/// (`[1-9][0-9]{0,15}`) and 16 after it, so that a model repeating a digit cannot fill its whole
/// answer with one number that never closes. berth allows 16 before and 8 after, the most
/// llguidance's `multipleOf` can count (its remainder arithmetic is 32-bit: 9·10^9 overflows).
const INTEGER_LIMIT: i64 = 9_999_999_999_999_999;
const FRACTION_DIGITS: u32 = 8;

/// Give every number schema without bounds those limits (an integer part within
/// ±9999999999999999, at most 8 decimals), and refuse a `multipleOf` finer than 8 decimals. Values (`const`, `enum`, `default`,
/// `examples`) are data, not schemas, and are left alone.
fn bound_numbers(schema: &mut Value) -> Result<(), String> {
    match schema {
        Value::Object(map) => {
            let is = |kind: &str| match map.get("type") {
                Some(Value::String(t)) => t == kind,
                Some(Value::Array(ts)) => ts.iter().any(|t| t == kind),
                _ => false,
            };
            let (integer, number) = (is("integer"), is("number"));
            if integer || number {
                if !map.contains_key("maximum") && !map.contains_key("exclusiveMaximum") {
                    map.insert("maximum".into(), INTEGER_LIMIT.into());
                }
                if !map.contains_key("minimum") && !map.contains_key("exclusiveMinimum") {
                    map.insert("minimum".into(), (-INTEGER_LIMIT).into());
                }
            }
            match map.get("multipleOf").and_then(Value::as_f64) {
                Some(step) if decimals(step) > FRACTION_DIGITS => {
                    return Err(format!(
                        "multipleOf {step} has more than {FRACTION_DIGITS} decimal places, the most berth can enforce"
                    ));
                }
                None if number && !integer => {
                    map.insert("multipleOf".into(), 10f64.powi(-(FRACTION_DIGITS as i32)).into());
                }
                _ => {}
            }
            for (key, value) in map.iter_mut() {
                if !matches!(key.as_str(), "const" | "enum" | "default" | "examples") {
                    bound_numbers(value)?;
                }
            }
            Ok(())
        }
        Value::Array(items) => items.iter_mut().try_for_each(bound_numbers),
        _ => Ok(()),
    }
}

/// Decimal places of a number as JSON writes it (`0.25` → 2, `1e-9` → 9).
fn decimals(x: f64) -> u32 {
    let text = format!("{x:e}");
    let (mantissa, exponent) = text.split_once('e').unwrap_or((&text, "0"));
    let digits = mantissa.split_once('.').map_or(0, |(_, f)| f.len() as i64);
    (digits - exponent.parse::<i64>().unwrap_or(0)).max(0) as u32
}

/// llguidance's message in a client's words (no crate features, no internal prefixes).
fn plain(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    let text = text.strip_prefix("Error: ").unwrap_or(&text);
    let text = if let Some(keys) = text.strip_prefix("Unimplemented keys: ") {
        format!("berth cannot enforce the JSON Schema keywords {keys}; leave them out of the schema")
    } else if let Some(rest) =
        text.strip_prefix("Only absolute $ref's (#/...) are supported without 'referencing' feature; ")
    {
        format!("a $ref must point inside the schema (`#/$defs/...`); {rest}")
    } else if text.starts_with("panic") {
        // llguidance caught a panic of its own: its backtrace is no use to a client.
        "the grammar compiler failed on this grammar; simplify it".to_string()
    } else {
        text.to_string()
    };
    text.chars().take(1000).collect()
}

/// One sequence's grammar state.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
    /// A lazy grammar's opening: the grammar applies to what follows it, and until the model
    /// produces it the answer is free.
    trigger: Option<Trigger>,
}

/// What switches a lazy grammar on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// The model produces this token (a format's own opening token, `<tool_call>` in Qwen 2.5).
    Token(u32),
    /// The answer's text comes to end with this (where the vocabulary has no such token).
    Text(String),
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").field("stopped", &self.matcher.is_stopped()).finish()
    }
}

impl Constraint {
    /// The same grammar, applied only after the model produces its opening (a tool call's).
    pub fn after(self, trigger: Trigger) -> Constraint {
        Constraint { trigger: Some(trigger), ..self }
    }

    /// What switches a lazy grammar on (`None`: it applies from the start).
    pub fn trigger(&self) -> Option<&Trigger> {
        self.trigger.as_ref()
    }

    /// The tokens the grammar allows next (end-of-generation among them where it may end).
    pub fn allowed(&mut self) -> Result<SimpleVob, EngineError> {
        let mask = self.matcher.compute_mask().map_err(|e| grammar_failed(&e))?;
        if mask.is_zero() {
            return Err(EngineError::Grammar("the grammar allows no token here".into()));
        }
        Ok(mask)
    }

    /// Advance past a token the model produced.
    pub fn consume(&mut self, token: u32) -> Result<(), EngineError> {
        self.matcher.consume_token(token).map_err(|e| grammar_failed(&e))
    }

    /// The tokens the grammar forces from here (possibly none), consumed already.
    pub fn forced(&mut self, limit: usize) -> Vec<u32> {
        let mut tokens = self.matcher.compute_ff_tokens();
        tokens.truncate(limit);
        if !tokens.is_empty() && self.matcher.consume_tokens(&tokens).is_err() {
            return Vec::new();
        }
        tokens
    }

    /// Whether the grammar is complete and allows nothing more.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

fn grammar_failed(e: &anyhow::Error) -> EngineError {
    EngineError::Grammar(plain(e))
}

/// Set every token the mask forbids to −∞ (tokens past the vocabulary's end too: a model's output
/// rows may be padded beyond its tokenizer).
pub fn apply_mask(logits: &mut [f32], mask: &SimpleVob) {
    let n = mask.len();
    for (i, l) in logits.iter_mut().enumerate() {
        if i >= n || !mask.is_allowed(i as u32) {
            *l = f32::NEG_INFINITY;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_get_bounds_and_data_is_left_alone() {
        let mut s = json!({"type": "object", "properties": {
            "n": {"type": "integer"},
            "x": {"type": ["number", "null"], "maximum": 5},
            "m": {"type": "number", "multipleOf": 0.25},
            "c": {"const": {"type": "integer"}}
        }});
        bound_numbers(&mut s).unwrap();
        let p = &s["properties"];
        assert_eq!(p["n"]["maximum"], json!(INTEGER_LIMIT));
        assert_eq!(p["n"]["minimum"], json!(-INTEGER_LIMIT));
        assert!(p["n"].get("multipleOf").is_none(), "integers need no decimals bound");
        assert_eq!(p["x"]["maximum"], json!(5));
        assert_eq!(p["x"]["minimum"], json!(-INTEGER_LIMIT));
        assert_eq!(p["x"]["multipleOf"], json!(1e-8));
        assert_eq!(p["m"]["multipleOf"], json!(0.25));
        assert_eq!(p["c"], json!({"const": {"type": "integer"}}));
        assert!(bound_numbers(&mut json!({"type": "number", "multipleOf": 1e-9})).is_err());
    }

    #[test]
    fn decimal_places() {
        assert_eq!(decimals(0.25), 2);
        assert_eq!(decimals(1e-9), 9);
        assert_eq!(decimals(1e-8), 8);
        assert_eq!(decimals(5.0), 0);
        assert_eq!(decimals(1500.0), 0);
        assert_eq!(decimals(0.1), 1);
    }
}
