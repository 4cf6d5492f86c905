#![no_main]
//! Any request body on every generating endpoint, through the handlers' own parsing and checks to
//! validated requests: an error message, or requests the scheduler accepts as they are; and the
//! gateway's readers of bodies and answers, on the same bytes.
//!
//! Input: the first byte picks the endpoint and the model's limits, the rest is the body.

use berth_engine::RequestLimits;
use berth_server::fuzzing::{Api, validate_body};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else { return };
    let api = [Api::OpenAiChat, Api::OpenAiCompletion, Api::OllamaChat, Api::OllamaGenerate][(pick & 3) as usize];
    let limits = match pick >> 2 & 3 {
        0 => RequestLimits { context: 8192, kv_tokens: 1 << 20, vocab: 49152 },
        1 => RequestLimits { context: 64, kv_tokens: 32, vocab: 100 },
        2 => RequestLimits { context: 2, kv_tokens: 16, vocab: 1 },
        _ => RequestLimits { context: 1 << 20, kv_tokens: 1 << 16, vocab: 1 << 17 },
    };
    // The gateway reads the same bodies (and replicas' answers) for routing and usage.
    berth_server::fuzzing::gateway_reads(body);
    if let Ok(requests) = validate_body(api, body, &limits) {
        for r in requests {
            assert!(berth_engine::request::check(&r, &limits).is_ok());
            assert!(r.prompt.len() + r.max_tokens <= limits.context);
            assert!(r.stop.len() <= berth_engine::request::MAX_STOPS);
            assert!((0.0..=2.0).contains(&r.sampling.temperature));
        }
    }
});
