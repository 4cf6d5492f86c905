#![no_main]
//! Any template source with any messages: compiling and rendering end in a prompt or an error,
//! never a panic or a stack overflow. (Memory and time beyond the fuel are the worker process's
//! limits in the berth binary; this target renders in-process, on the renderer's own stack.)
//!
//! Input: the template source, a NUL byte, then messages as `role\tcontent` lines.

use berth_engine::template::{ChatTemplate, Message, vet};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (source, rest) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(source) = std::str::from_utf8(source) else { return };
    let messages: Vec<Message> = String::from_utf8_lossy(rest)
        .lines()
        .take(64)
        .map(|l| match l.split_once('\t') {
            Some((role, content)) => Message::new(role, content),
            None => Message::new("user", l),
        })
        .collect();
    let _ = vet(source);
    if let Ok(template) = ChatTemplate::new(source, "<s>", "</s>") {
        for add_generation_prompt in [false, true] {
            if let Ok(text) = template.render(&messages, add_generation_prompt) {
                assert!(text.len() <= berth_engine::template::MAX_RENDERED_BYTES);
            }
        }
    }
});
