#![no_main]
//! Any template source with any messages: compiling and rendering end in a prompt or an error,
//! never a panic, a stack overflow or a runaway allocation in this process. As in the berth
//! binary, templates render in worker processes (`berth __template-worker`, named by
//! `BERTH_FUZZ_TEMPLATE_WORKER`; scripts/fuzz sets it): a template that builds values deep enough
//! to overflow any stack, or large enough to exhaust memory, kills only its worker. Without the
//! variable the target renders in-process, on the renderer's own stack.
//!
//! Input: the template source, a NUL byte, then messages as `role\tcontent` lines; the first line
//! `+` asks for the generation prompt.

use berth_engine::template::{ChatTemplate, Message, sandbox};
use libfuzzer_sys::fuzz_target;

static WORKERS: std::sync::Once = std::sync::Once::new();

fuzz_target!(|data: &[u8]| {
    WORKERS.call_once(|| {
        if let Some(worker) = std::env::var_os("BERTH_FUZZ_TEMPLATE_WORKER") {
            sandbox::use_worker_processes(worker.into(), vec!["__template-worker".into()]);
        }
    });
    let (source, rest) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(source) = std::str::from_utf8(source) else { return };
    let text = String::from_utf8_lossy(rest);
    let add_generation_prompt = text.starts_with('+');
    let messages: Vec<Message> = text
        .trim_start_matches('+')
        .lines()
        .take(64)
        .map(|l| match l.split_once('\t') {
            Some((role, content)) => Message::new(role, content),
            None => Message::new("user", l),
        })
        .collect();
    if let Ok(template) = ChatTemplate::new(source, "<s>", "</s>")
        && let Ok(text) = template.render(&messages, add_generation_prompt)
    {
        assert!(text.len() <= berth_engine::template::MAX_RENDERED_BYTES);
    }
});
