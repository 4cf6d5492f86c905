#![no_main]
//! Any structured-output constraint a client can send (a JSON schema, a Lark grammar, a regex),
//! compiled against a byte-level vocabulary and then driven for a few tokens: a clear error or a
//! grammar whose masks and steps never panic, never allow nothing without saying so, and finish.
//!
//! Input: the first byte picks the kind, the rest is the schema (JSON) or grammar text.

use std::sync::{Arc, OnceLock};

use berth_engine::constraint::{ConstraintSpec, Grammars};
use berth_engine::tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;

fn grammars() -> &'static Grammars {
    static GRAMMARS: OnceLock<Grammars> = OnceLock::new();
    GRAMMARS.get_or_init(|| {
        let bytes = berth_testkit::synthetic::tiny_llama(&Default::default()).build();
        let gguf = berth_formats::gguf::GgufFile::parse(&bytes).expect("the synthetic model parses");
        let tokenizer = Tokenizer::from_gguf(&gguf).expect("its tokenizer builds");
        Grammars::new(Arc::new(tokenizer)).expect("its grammar vocabulary builds")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let spec = match pick % 4 {
        0 => match serde_json::from_str(text) {
            Ok(schema) => ConstraintSpec::JsonSchema(schema),
            Err(_) => return,
        },
        1 => ConstraintSpec::Lark(text.to_string()),
        2 => ConstraintSpec::Regex(text.to_string()),
        _ => ConstraintSpec::JsonObject,
    };
    let Ok(mut constraint) = grammars().compile(&spec, "response_format") else { return };
    // Walk the grammar: the lowest allowed token each step (or what it forces).
    for _ in 0..32 {
        if constraint.is_finished() {
            break;
        }
        let Ok(mask) = constraint.allowed() else { break };
        let mut next = None;
        mask.iter_set_entries(|t| {
            if next.is_none() {
                next = Some(t as u32);
            }
        });
        let Some(token) = next else { panic!("a mask with no token must be an error") };
        if constraint.consume(token).is_err() {
            break;
        }
        constraint.forced(8);
    }
});
